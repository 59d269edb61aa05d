//! weir's scheduler.
