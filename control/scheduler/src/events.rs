//! A core/v1 Event recorder that aggregates repeats as client-go's EventRecorder does (its
//! EventCorrelator): an Event with the same source, involved object, type, reason and
//! message as one already written bumps that Event's `count` and `lastTimestamp` with a PATCH
//! instead of writing another, so `kubectl describe` shows `(x5 over 2m)`. A spam filter per
//! source and object — a bucket of 25 writes refilled one per 5 minutes, client-go's
//! defaults — bounds the writes for an object that keeps failing.
//!
//! Recording never waits on the API: writes go, in order, through one background task, so a
//! PATCH never overtakes the create of the Event it counts.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

/// Events remembered for aggregation and objects for the spam filter (client-go's LRU size).
const MAX_ENTRIES: usize = 4096;
const SPAM_BURST: f64 = 25.0;
const SPAM_REFILL: Duration = Duration::from_secs(300);
/// Writes waiting for the API; beyond this, events are dropped (they are best effort).
const QUEUE: usize = 1024;

/// One write to the API.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Create(Event),
    /// Bump the Event `event.metadata.name`; if it is gone (expired), create it afresh.
    Count(Event),
}

/// A map that forgets its oldest entries beyond [`MAX_ENTRIES`].
#[derive(Debug)]
struct Bounded<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
}

impl<V> Default for Bounded<V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Bounded<V> {
    fn entry(&mut self, key: String, new: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&key) {
            if self.order.len() >= MAX_ENTRIES
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
            self.order.push_back(key.clone());
        }
        self.map.entry(key).or_insert_with(new)
    }
}

#[derive(Debug)]
struct Seen {
    name: String,
    count: i32,
    first: Option<Time>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The pure part: decides, for each recorded Event, what to write.
#[derive(Debug, Default)]
pub struct Correlator {
    seen: Bounded<Seen>,
    spam: Bounded<Bucket>,
}

fn s(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("")
}

/// What makes two events of one object the same, as client-go's `getEventKey`.
fn event_key(e: &Event) -> String {
    let o = &e.involved_object;
    let src = e.source.clone().unwrap_or_default();
    [
        s(&src.component),
        s(&src.host),
        s(&o.kind),
        s(&o.namespace),
        s(&o.name),
        s(&o.field_path),
        s(&o.uid),
        s(&o.api_version),
        s(&e.type_),
        s(&e.reason),
        s(&e.message),
    ]
    .join("\u{0}")
}

/// Whose events share one spam bucket, as client-go's `getSpamKey`.
fn spam_key(e: &Event) -> String {
    let o = &e.involved_object;
    let src = e.source.clone().unwrap_or_default();
    [
        s(&src.component),
        s(&src.host),
        s(&o.kind),
        s(&o.namespace),
        s(&o.name),
        s(&o.uid),
        s(&o.api_version),
    ]
    .join("\u{0}")
}

impl Correlator {
    /// The write for `event` observed at `now` (`clock` for the spam filter), or None if
    /// the spam filter drops it. `event` carries its own name and timestamps.
    pub fn observe(&mut self, mut event: Event, now: Timestamp, clock: Instant) -> Option<Write> {
        let mut created = false;
        let seen = self.seen.entry(event_key(&event), || {
            created = true;
            Seen {
                name: event.metadata.name.clone().unwrap_or_default(),
                count: 0,
                first: event.first_timestamp.clone(),
            }
        });
        // Counted even when the spam filter drops the write, so the next write that gets
        // through carries every occurrence (as client-go).
        seen.count = seen.count.saturating_add(1);
        event.metadata.name = Some(seen.name.clone());
        event.count = Some(seen.count);
        event.first_timestamp = seen.first.clone();
        event.last_timestamp = Some(Time(now));
        let bucket = self.spam.entry(spam_key(&event), || Bucket {
            tokens: SPAM_BURST,
            at: clock,
        });
        let refill = clock.duration_since(bucket.at).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        bucket.tokens = (bucket.tokens + refill).min(SPAM_BURST);
        bucket.at = clock;
        if bucket.tokens < 1.0 {
            return None;
        }
        bucket.tokens -= 1.0;
        Some(if created {
            Write::Create(event)
        } else {
            Write::Count(event)
        })
    }
}

/// Records Events through the API, aggregated and rate limited (module docs).
pub struct Recorder {
    correlator: Mutex<Correlator>,
    writes: mpsc::Sender<Write>,
}

impl Recorder {
    /// A recorder writing through `client`; its writer task runs until the recorder is
    /// dropped. Must be called within a tokio runtime.
    pub fn new(client: Client) -> Self {
        let (writes, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(client, rx));
        Recorder {
            correlator: Mutex::new(Correlator::default()),
            writes,
        }
    }

    /// Record `event` (best effort: failures are logged at debug level, as the kubelet's and
    /// kube-scheduler's recorders do).
    pub fn record(&self, event: Event) {
        let write = self
            .correlator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(event, Timestamp::now(), Instant::now());
        if let Some(w) = write
            && self.writes.try_send(w).is_err()
        {
            debug!("event queue full; event dropped");
        }
    }
}

async fn write_all(client: Client, mut rx: mpsc::Receiver<Write>) {
    while let Some(write) = rx.recv().await {
        let (event, bump) = match write {
            Write::Create(e) => (e, false),
            Write::Count(e) => (e, true),
        };
        let ns = event.metadata.namespace.clone().unwrap_or_default();
        let name = event.metadata.name.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        if bump {
            let patch = serde_json::json!({
                "count": event.count,
                "lastTimestamp": event.last_timestamp,
                "message": event.message,
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => continue,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    debug!(event = %name, namespace = %ns, error = %e, "could not update event");
                    continue;
                }
            }
        }
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            debug!(event = %name, namespace = %ns, error = %e, "could not record event");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{EventSource, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn event(name: &str, pod: &str, message: &str, at: Timestamp) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("default".into()),
                name: Some(pod.into()),
                uid: Some(format!("uid-{pod}")),
                ..Default::default()
            },
            reason: Some("FailedScheduling".into()),
            message: Some(message.into()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("default-scheduler".into()),
                host: None,
            }),
            first_timestamp: Some(Time(at)),
            last_timestamp: Some(Time(at)),
            count: Some(1),
            ..Default::default()
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_repeat_bumps_count_and_last_timestamp_of_the_first_event() {
        let mut c = Correlator::default();
        let clock = Instant::now();
        let t0 = ts("2026-01-01T00:00:00Z");
        let first = c.observe(event("p.1", "p", "0/1 nodes", t0), t0, clock);
        let Some(Write::Create(e)) = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            (e.count, e.metadata.name.as_deref()),
            (Some(1), Some("p.1"))
        );
        let t1 = ts("2026-01-01T00:00:10Z");
        let again = c.observe(event("p.2", "p", "0/1 nodes", t1), t1, clock);
        let Some(Write::Count(e)) = again else {
            panic!("{again:?}")
        };
        assert_eq!(e.metadata.name.as_deref(), Some("p.1"));
        assert_eq!(e.count, Some(2));
        assert_eq!(e.first_timestamp, Some(Time(t0)));
        assert_eq!(e.last_timestamp, Some(Time(t1)));
        // Another message, or another pod, is another Event.
        let other = c.observe(event("p.3", "p", "0/2 nodes", t1), t1, clock);
        assert!(matches!(other, Some(Write::Create(_))), "{other:?}");
        let other = c.observe(event("q.1", "q", "0/1 nodes", t1), t1, clock);
        assert!(matches!(other, Some(Write::Create(_))), "{other:?}");
    }

    #[test]
    fn an_object_gets_25_writes_then_one_per_five_minutes() {
        let mut c = Correlator::default();
        let clock = Instant::now();
        let t = ts("2026-01-01T00:00:00Z");
        let written = (0..30)
            .filter_map(|i| c.observe(event(&format!("p.{i}"), "p", "m", t), t, clock))
            .count();
        assert_eq!(written, 25);
        assert!(c.observe(event("p.x", "p", "m", t), t, clock).is_none());
        // Other objects have buckets of their own.
        assert!(c.observe(event("q.1", "q", "m", t), t, clock).is_some());
        let later = clock + SPAM_REFILL;
        let Some(Write::Count(e)) = c.observe(event("p.y", "p", "m", t), t, later) else {
            panic!("refilled")
        };
        // Every occurrence counted, dropped ones included.
        assert_eq!(e.count, Some(32));
        assert!(c.observe(event("p.z", "p", "m", t), t, later).is_none());
    }

    #[test]
    fn the_oldest_entries_are_forgotten_beyond_the_bound() {
        let mut b: Bounded<u32> = Bounded::default();
        for i in 0..=MAX_ENTRIES {
            *b.entry(i.to_string(), || 0) += 1;
        }
        assert_eq!(b.map.len(), MAX_ENTRIES);
        assert!(!b.map.contains_key("0"));
        assert!(b.map.contains_key(&MAX_ENTRIES.to_string()));
    }
}
