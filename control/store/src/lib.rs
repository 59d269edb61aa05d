//! weir's storage layer: one `Store` trait, implemented by etcd and by an embedded on-disk backend, with one conformance suite.
