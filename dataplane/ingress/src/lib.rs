//! weir's ingress proxy.
