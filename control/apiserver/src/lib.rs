//! weir's Kubernetes-compatible HTTPS API server.
