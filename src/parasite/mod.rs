//! Remote system calls and the injected parasite blob. OWNER: parasite helper. (stub)
