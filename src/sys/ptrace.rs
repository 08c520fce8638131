//! ptrace wrappers. OWNER: parasite helper. (stub)
