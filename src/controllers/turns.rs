//! Controller slots shared fairly across namespaces.
//!
//! A kube `Controller` runs at most `--controller-concurrency` reconciles at once and
//! picks the next object from its queue in no particular order. A reconcile that issues
//! a certificate holds its slot while its key is generated (up to seconds for
//! RSA-4096), so one namespace with hundreds of Services pending would hold every slot,
//! and an object of another namespace would wait for a slot behind most of them,
//! whatever the key pool's order. Here a namespace holds at most half of a
//! controller's slots: a pass for a namespace already at its share does nothing and is
//! deferred, and each pass of that namespace that ends starts its next deferred one.
//! The other half stays free for every other namespace.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Who holds slots and who waits, per namespace (pure; see [`Gate`] for the shared
/// handle).
#[derive(Debug)]
pub struct Turns<T> {
    /// The most slots one namespace holds at once.
    share: usize,
    busy: HashMap<String, usize>,
    /// Objects deferred, per namespace, in order (each once).
    deferred: HashMap<String, VecDeque<T>>,
    queued: HashSet<T>,
}

impl<T: Clone + Eq + Hash> Turns<T> {
    /// A namespace may hold half of `slots` (at least one).
    pub fn new(slots: u16) -> Self {
        let share = usize::from(slots / 2).max(1);
        Turns { share, busy: HashMap::new(), deferred: HashMap::new(), queued: HashSet::new() }
    }

    /// A pass for `item` in `namespace` may start (and holds a slot until
    /// [`Turns::leave`]); otherwise `item` is deferred.
    pub fn enter(&mut self, namespace: &str, item: T) -> bool {
        let busy = self.busy.entry(namespace.to_string()).or_insert(0);
        if *busy < self.share {
            *busy = busy.saturating_add(1);
            return true;
        }
        if self.queued.insert(item.clone()) {
            self.deferred.entry(namespace.to_string()).or_default().push_back(item);
        }
        false
    }

    /// A pass in `namespace` ended: its slot is free, and the namespace's next deferred
    /// object that is still `wanted` (if any) is to be started again. The others are
    /// dropped: a deleted object is never started again, so it could not pass the turn
    /// on and the objects deferred behind it would wait for an unrelated change.
    pub fn leave(&mut self, namespace: &str, wanted: impl Fn(&T) -> bool) -> Option<T> {
        if let Some(busy) = self.busy.get_mut(namespace) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.busy.remove(namespace);
            }
        }
        let waiting = self.deferred.get_mut(namespace)?;
        let mut next = None;
        while let Some(item) = waiting.pop_front() {
            self.queued.remove(&item);
            if wanted(&item) {
                next = Some(item);
                break;
            }
        }
        if waiting.is_empty() {
            self.deferred.remove(namespace);
        }
        next
    }
}

/// The shared handle a controller's passes go through: [`Gate::enter`] gives a
/// [`Slot`] (released when dropped) or defers the object; a deferred object is sent to
/// `again` when its turn comes (the controller's `reconcile_on` stream), if it is still
/// `wanted` (in the controller's cache).
pub struct Gate<T> {
    turns: Mutex<Turns<T>>,
    again: tokio::sync::mpsc::UnboundedSender<T>,
    wanted: Box<dyn Fn(&T) -> bool + Send + Sync>,
}

impl<T: Clone + Eq + Hash + Send + 'static> Gate<T> {
    /// A gate for a controller with `slots` slots, and the stream of objects to start
    /// again.
    pub fn new(
        slots: u16,
        wanted: impl Fn(&T) -> bool + Send + Sync + 'static,
    ) -> (Arc<Self>, impl futures::Stream<Item = T> + Send + 'static) {
        let (again, rx) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(Gate { turns: Mutex::new(Turns::new(slots)), again, wanted: Box::new(wanted) });
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        (gate, stream)
    }

    /// A slot for a pass over `item` in `namespace`, or `None`: deferred until a pass
    /// of that namespace ends.
    pub fn enter(self: &Arc<Self>, namespace: &str, item: T) -> Option<Slot<T>> {
        let entered = self.turns.lock().map_or(true, |mut turns| turns.enter(namespace, item));
        entered.then(|| Slot { gate: self.clone(), namespace: namespace.to_string() })
    }
}

/// A slot held by one pass.
pub struct Slot<T: Clone + Eq + Hash + Send + 'static> {
    gate: Arc<Gate<T>>,
    namespace: String,
}

impl<T: Clone + Eq + Hash + Send + 'static> Drop for Slot<T> {
    fn drop(&mut self) {
        let wanted = &self.gate.wanted;
        let next = self.gate.turns.lock().ok().and_then(|mut turns| turns.leave(&self.namespace, wanted));
        if let Some(next) = next {
            let _ = self.gate.again.send(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_holds_at_most_half_the_slots_and_its_deferred_objects_start_in_order() {
        let mut turns = Turns::new(4);
        assert!(turns.enter("a", "a1") && turns.enter("a", "a2"));
        assert!(!turns.enter("a", "a3") && !turns.enter("a", "a4"), "a holds its share");
        assert!(!turns.enter("a", "a3"), "deferred once");
        assert!(turns.enter("b", "b1") && turns.enter("b", "b2"), "the other half is free for others");
        let all = |_: &&str| true;
        assert_eq!(turns.leave("a", all), Some("a3"));
        assert!(turns.enter("a", "a3"), "its turn");
        assert_eq!(turns.leave("a", all), Some("a4"));
        assert_eq!(turns.leave("b", all), None);
        assert!(turns.enter("a", "a4"));
        for ns in ["a", "a", "b"] {
            assert_eq!(turns.leave(ns, all), None);
        }
        assert!(turns.busy.is_empty() && turns.deferred.is_empty() && turns.queued.is_empty(), "nothing kept");
    }

    #[test]
    fn one_slot_is_not_shared() {
        let mut turns = Turns::new(1);
        assert!(turns.enter("a", 1));
        assert!(!turns.enter("a", 2));
        assert!(turns.enter("b", 3), "a share is at least one slot");
    }

    #[test]
    fn a_deferred_object_gone_meanwhile_passes_its_turn_on() {
        let mut turns = Turns::new(2);
        assert!(turns.enter("a", "a1"));
        assert!(!turns.enter("a", "gone") && !turns.enter("a", "a2"));
        assert_eq!(turns.leave("a", |item| *item != "gone"), Some("a2"));
        assert!(turns.deferred.is_empty() && turns.queued.is_empty(), "nothing kept");
    }

    #[tokio::test]
    async fn a_dropped_slot_starts_the_next_deferred_object() {
        use futures::StreamExt;
        let (gate, again) = Gate::new(2, |_| true);
        let mut again = Box::pin(again);
        let slot = gate.enter("a", "a1");
        assert!(slot.is_some());
        assert!(gate.enter("a", "a2").is_none());
        drop(slot);
        assert_eq!(again.next().await, Some("a2"));
    }
}
