//! Sharing equal values: pods of one workload have the same labels, service
//! account and workload name, so the store keeps one copy of each and counts
//! on reference counts to drop it when the last pod using it goes.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

/// A set of shared values.
#[derive(Debug)]
pub(crate) struct Interner<T: ?Sized + Eq + Hash> {
    values: HashSet<Arc<T>>,
}

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Self {
            values: HashSet::new(),
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The shared copy of `value`, made from `make` the first time.
    pub(crate) fn intern<Q>(&mut self, value: &Q, make: impl FnOnce(&Q) -> Arc<T>) -> Arc<T>
    where
        Arc<T>: Borrow<Q>,
        Q: ?Sized + Eq + Hash,
    {
        if let Some(shared) = self.values.get(value) {
            return shared.clone();
        }
        let shared = make(value);
        self.values.insert(shared.clone());
        shared
    }

    /// Called when a user of `value` lets go of it: forgets the value when the
    /// caller's was the last use besides the interner's own.
    pub(crate) fn release(&mut self, value: &Arc<T>) {
        if Arc::strong_count(value) == 2 {
            self.values.remove(value);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_until_the_last_user_lets_go() {
        let mut names: Interner<str> = Interner::default();
        let a = names.intern("echo", |name| Arc::from(name));
        let b = names.intern("echo", |name| Arc::from(name));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(names.len(), 1);
        names.release(&a);
        drop(a);
        assert_eq!(names.len(), 1, "b still uses it");
        names.release(&b);
        drop(b);
        assert_eq!(names.len(), 0);
    }
}
