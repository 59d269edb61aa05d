//! weir's controllers.
