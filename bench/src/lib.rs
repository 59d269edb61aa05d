//! Shared pieces of weir's benchmark harnesses.
