//! weir's cluster DNS server.
