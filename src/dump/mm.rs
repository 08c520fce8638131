//! Memory mappings (stub)
