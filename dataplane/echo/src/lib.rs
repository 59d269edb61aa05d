//! weir echo.
