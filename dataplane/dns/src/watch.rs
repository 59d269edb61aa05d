//! The thin watch layer: kube-rs watchers on Services, EndpointSlices and Pods feed one task
//! that owns the [`Zone`] writer and applies each event as a diff. After a (re)list, objects
//! the list no longer holds are deleted, so a missed delete cannot leave a stale record.

use std::collections::HashSet;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::records::ObjKey;
use crate::zone::Zone;

enum Change {
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
    Pod(Box<Event<Pod>>),
}

fn watch<K>(client: &Client, wrap: fn(Event<K>) -> Change) -> impl Stream<Item = Change> + use<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| async move {
            match r {
                Ok(ev) => Some(wrap(ev)),
                Err(e) => {
                    tracing::warn!(error = %e, kind = K::kind(&()).as_ref(), "DNS watch error, retrying");
                    None
                }
            }
        })
}

/// Keys seen during a relist of each kind.
#[derive(Default)]
struct Relist {
    services: Option<HashSet<ObjKey>>,
    slices: Option<HashSet<ObjKey>>,
    pods: Option<HashSet<ObjKey>>,
}

/// Apply watch events to `zone` until `shutdown`. `synced` is cancelled once all three
/// initial lists have been applied and published.
pub async fn run(
    client: Client,
    mut zone: Zone,
    shutdown: CancellationToken,
    synced: CancellationToken,
) {
    let events = futures::stream::select(
        watch::<Service>(&client, |ev| Change::Service(Box::new(ev))),
        futures::stream::select(
            watch::<EndpointSlice>(&client, |ev| Change::Slice(Box::new(ev))),
            watch::<Pod>(&client, |ev| Change::Pod(Box::new(ev))),
        ),
    );
    let mut events = std::pin::pin!(events);
    let mut relist = Relist::default();
    let mut done = [false; 3];
    loop {
        let change = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = events.next() => match c { Some(c) => c, None => return },
        };
        let publish = match change {
            Change::Service(ev) => apply(
                *ev,
                &mut relist.services,
                &mut zone,
                &mut done[0],
                |z, s| z.apply_service(s),
                |z, k| z.delete_service(k),
                Zone::service_keys,
            ),
            Change::Slice(ev) => apply(
                *ev,
                &mut relist.slices,
                &mut zone,
                &mut done[1],
                |z, s| z.apply_slice(s),
                |z, k| z.delete_slice(k),
                Zone::slice_keys,
            ),
            Change::Pod(ev) => apply(
                *ev,
                &mut relist.pods,
                &mut zone,
                &mut done[2],
                |z, p| z.apply_pod(p),
                |z, k| z.delete_pod(k),
                Zone::pod_keys,
            ),
        };
        if publish {
            zone.publish();
            if done.iter().all(|d| *d) {
                synced.cancel();
            }
        }
    }
}

/// Apply one event; true when the zone should be published (after every change outside a
/// relist, and once at the end of a relist).
fn apply<K: kube::Resource>(
    ev: Event<K>,
    seen: &mut Option<HashSet<ObjKey>>,
    zone: &mut Zone,
    done: &mut bool,
    upsert: impl Fn(&mut Zone, &K),
    delete: impl Fn(&mut Zone, &ObjKey),
    keys: impl Fn(&Zone) -> Vec<ObjKey>,
) -> bool {
    match ev {
        Event::Apply(obj) => {
            upsert(zone, &obj);
            true
        }
        Event::Delete(obj) => {
            delete(zone, &ObjKey::of(obj.meta()));
            true
        }
        Event::Init => {
            *seen = Some(HashSet::new());
            false
        }
        Event::InitApply(obj) => {
            seen.get_or_insert_default().insert(ObjKey::of(obj.meta()));
            upsert(zone, &obj);
            false
        }
        Event::InitDone => {
            let seen = seen.take().unwrap_or_default();
            for key in keys(zone) {
                if !seen.contains(&key) {
                    delete(zone, &key);
                }
            }
            *done = true;
            true
        }
    }
}
