//! The strings of written events, kept for the texts of requests to come: a request takes emptied ones instead
//! of allocating, so its strings are neither made on the request path nor freed on the worker, one by one. And
//! the states of finished requests, kept the same way.

use std::sync::{Arc, Mutex};

use crate::event::AuditEvent;
use crate::request::RequestState;

/// The text fields of a request's event that get kept strings: path, route, request id, user agent.
const FIELDS: usize = 4;

/// Strings kept per field, at most: a default batch's worth ...
const KEPT: usize = 512;
/// ... each of at most this capacity (a longer one is freed, so a rare long path does not stay held): at most
/// 512 KiB in all.
const KEPT_CAPACITY: usize = 256;
/// Request states kept, at most (a few hundred bytes each, their strings emptied): enough for the requests that
/// finish while others start on a busy server.
const KEPT_STATES: usize = 256;

/// Strings of written events, by field (so their capacities fit the texts they will hold). The worker puts a
/// batch's strings back at once; a request takes what it needs with one lock, and never waits for it: when
/// another thread holds the lock, the request allocates as it would without any kept.
#[derive(Debug, Default)]
pub(crate) struct Recycled {
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    strings: [Vec<String>; FIELDS],
    /// Each held by nobody else (so `Arc::get_mut` reuses it), with its strings emptied. A state holds no
    /// reference to the pipeline, so keeping it here keeps nothing alive.
    states: Vec<Arc<RequestState>>,
}

impl Recycled {
    /// Strings for the fields `wanted` (path, route, request id, user agent, in this order): a kept one
    /// (empty) where there is one; otherwise (and for fields not wanted) a new empty one, which has not
    /// allocated yet. With them, a kept request state, if there is one.
    pub(crate) fn take(&self, wanted: [bool; FIELDS]) -> ([String; FIELDS], Option<Arc<RequestState>>) {
        let Ok(mut kept) = self.kept.try_lock() else { return Default::default() };
        let kept = &mut *kept;
        let strings = &mut kept.strings;
        let mut take =
            |field: usize| if wanted[field] { strings[field].pop().unwrap_or_default() } else { String::new() };
        ([take(0), take(1), take(2), take(3)], kept.states.pop())
    }

    /// Keeps the state of a finished request, which nobody else holds, for a request to come; frees it when
    /// enough are kept or another thread holds the lock (never waiting for it).
    pub(crate) fn keep(&self, state: Arc<RequestState>) {
        if let Ok(mut kept) = self.kept.try_lock()
            && kept.states.len() < KEPT_STATES
            && !state.fields.is_poisoned()
        {
            kept.states.push(state);
        }
    }

    /// Empties `events`, keeping the strings of their text fields (emptied).
    pub(crate) fn recycle(&self, events: &mut Vec<AuditEvent>) {
        {
            let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for event in events.iter_mut() {
                let fields = [&mut event.path, &mut event.route, &mut event.request_id, &mut event.user_agent];
                for (kept, field) in kept.strings.iter_mut().zip(fields) {
                    if let Some(mut string) = field.take_if(|string| string.capacity() <= KEPT_CAPACITY)
                        && kept.len() < KEPT
                    {
                        string.clear();
                        kept.push(string);
                    }
                }
            }
        }
        events.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, request_id: Option<&str>) -> AuditEvent {
        let mut event = AuditEvent::new("http.request");
        event.path = Some(path.to_owned());
        event.request_id = request_id.map(str::to_owned);
        event
    }

    #[test]
    fn kept_strings_come_back_emptied_for_the_fields_wanted_only() {
        let recycled = Recycled::default();
        let mut events = vec![event("/a", Some("id-1")), event(&"x".repeat(KEPT_CAPACITY + 1), None)];
        recycled.recycle(&mut events);
        assert!(events.is_empty());
        let ([path, route, request_id, user_agent], _) = recycled.take([true, true, false, true]);
        // The path of the first event (the second's was too long to keep); the request id stays kept.
        assert_eq!((path.as_str(), path.capacity()), ("", 2));
        assert_eq!((route.capacity(), request_id.capacity(), user_agent.capacity()), (0, 0, 0));
        let ([path, _, request_id, _], _) = recycled.take([true; FIELDS]);
        assert_eq!((path.capacity(), request_id.as_str(), request_id.capacity()), (0, "", 4));
    }

    #[test]
    fn at_most_a_batch_is_kept_per_field() {
        let recycled = Recycled::default();
        let mut events: Vec<AuditEvent> = (0..KEPT + 10).map(|_| event("/a", None)).collect();
        recycled.recycle(&mut events);
        assert_eq!(recycled.kept.lock().unwrap().strings[0].len(), KEPT);
    }

    #[test]
    fn a_request_does_not_wait_for_the_lock() {
        let recycled = Recycled::default();
        recycled.recycle(&mut vec![event("/a", None)]);
        let held = recycled.kept.lock().unwrap();
        let ([path, ..], _) = recycled.take([true; FIELDS]);
        assert_eq!(path.capacity(), 0, "allocates nothing, and takes nothing, while the lock is held");
        drop(held);
        assert_eq!(recycled.take([true; FIELDS]).0[0].capacity(), 2);
    }
}
