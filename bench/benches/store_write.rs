//! Store write throughput: creates per second into the embedded store and into a real etcd
//! (started on loopback by `weir_store::EtcdProcess`), from one client and from 16
//! concurrent clients, the load of the API server's create benchmark. 1 KiB values, about
//! the size of a Service object. Run: `cargo bench -p weir-bench --bench store_write`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weir_store::{EmbeddedStore, EtcdProcess, EtcdStore, Store};

const CLIENTS: usize = 16;
const CREATES_PER_CLIENT: usize = 10;

/// Keys never repeat across iterations, so every create is a real insert.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn key() -> String {
    format!(
        "/registry/services/default/s{}",
        NEXT_KEY.fetch_add(1, Ordering::Relaxed)
    )
}

async fn sequential(store: &dyn Store, iters: u64) -> Duration {
    let value = vec![b'x'; 1024];
    let start = Instant::now();
    for _ in 0..iters {
        if let Err(e) = store.create(&key(), value.clone()).await {
            panic!("create failed: {e}");
        }
    }
    start.elapsed()
}

async fn concurrent(store: Arc<dyn Store>, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    for _ in 0..CREATES_PER_CLIENT {
                        if let Err(e) = store.create(&key(), vec![b'x'; 1024]).await {
                            panic!("create failed: {e}");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            if let Err(e) = task.await {
                panic!("client task failed: {e}");
            }
        }
    }
    start.elapsed()
}

fn bench_backend(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: Arc<dyn Store>,
) {
    let mut group = c.benchmark_group(format!("store_write/{name}"));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    group.bench_function("create, 1 client", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            async move { sequential(store.as_ref(), iters).await }
        })
    });
    group.throughput(Throughput::Elements((CLIENTS * CREATES_PER_CLIENT) as u64));
    group.bench_function(format!("create, {CLIENTS} clients"), |b| {
        b.to_async(rt)
            .iter_custom(|iters| concurrent(store.clone(), iters))
    });
    group.finish();
}

fn store_write(c: &mut Criterion) {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let dir = std::env::temp_dir().join(format!("weir-bench-store-{}", std::process::id()));
    let embedded = match EmbeddedStore::open(dir.join("store.redb")) {
        Ok(store) => store,
        Err(e) => panic!("embedded store: {e}"),
    };
    bench_backend(c, &rt, "embedded", Arc::new(embedded));
    let _ = std::fs::remove_dir_all(&dir);

    let (etcd, store) = rt.block_on(async {
        let etcd = match EtcdProcess::start().await {
            Ok(etcd) => etcd,
            Err(e) => panic!("etcd: {e}"),
        };
        match EtcdStore::connect(&[etcd.client_url()]).await {
            Ok(store) => (etcd, store),
            Err(e) => panic!("connect to etcd: {e}"),
        }
    });
    bench_backend(c, &rt, "etcd", Arc::new(store));
    drop(etcd);
}

criterion_group!(benches, store_write);
criterion_main!(benches);
