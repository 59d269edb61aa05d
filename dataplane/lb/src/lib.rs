//! weir's eBPF service load balancer: loads and pins the BPF programs and keeps their maps in step with Services and EndpointSlices.
