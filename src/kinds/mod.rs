//! One module per kind of file descriptor, dump and restore side by side.
//! OWNER: files helper. (stub)
