//! Encoded UDP answers to mesh questions, reused while the mesh is unchanged.
//!
//! A mesh answer depends only on the question's bytes (name as written, type,
//! class, flags, EDNS), the client's namespace and the mesh state. So the
//! encoded response to a datagram is kept under the datagram's bytes after its
//! 16-bit ID, plus the namespace, and a repeat of the question is answered by
//! copying it with the new ID. Every entry belongs to one mesh generation
//! ([`MeshDns::generation`](crate::MeshDns::generation), which only grows); a
//! new generation empties the cache, so no answer outlives the state it came
//! from. The cache
//! holds at most [`CAPACITY`] entries and starts over when full.

use std::collections::HashMap;

/// The most answers kept.
pub(crate) const CAPACITY: usize = 4096;

/// Questions longer than this are not cached (real questions are far shorter).
const MAX_KEY_BYTES: usize = 512;

/// Answers of one mesh generation, by question bytes and client namespace.
#[derive(Debug, Default)]
pub(crate) struct AnswerCache {
    generation: u64,
    answers: HashMap<Vec<u8>, Box<[u8]>>,
    /// The key of the current lookup, built in place to avoid an allocation.
    key: Vec<u8>,
    /// The response being sent, with the question's ID.
    reply: Vec<u8>,
}

impl AnswerCache {
    /// The response to `question` from a client in `namespace`, with the
    /// question's ID, if it was answered in this `generation`.
    pub(crate) fn get(
        &mut self,
        generation: u64,
        question: &[u8],
        namespace: Option<&str>,
    ) -> Option<&[u8]> {
        if !self.follow(generation) || !Self::fill_key(&mut self.key, question, namespace) {
            return None;
        }
        let cached = self.answers.get(self.key.as_slice())?;
        self.reply.clear();
        self.reply.extend_from_slice(question.get(..2)?);
        self.reply.extend_from_slice(cached.get(2..)?);
        Some(&self.reply)
    }

    /// Keeps `response` as the answer to `question` in `generation`.
    pub(crate) fn insert(
        &mut self,
        generation: u64,
        question: &[u8],
        namespace: Option<&str>,
        response: &[u8],
    ) {
        let mut key = Vec::new();
        if !self.follow(generation)
            || response.len() < 2
            || !Self::fill_key(&mut key, question, namespace)
        {
            return;
        }
        if self.answers.len() >= CAPACITY {
            self.answers.clear();
        }
        self.answers.insert(key, response.into());
    }

    /// Moves to `generation`, forgetting every answer when it is newer;
    /// `false` when it is older (an answer worked out from a state that has
    /// changed since).
    fn follow(&mut self, generation: u64) -> bool {
        if generation > self.generation {
            self.answers.clear();
            self.generation = generation;
        }
        generation == self.generation
    }

    /// How many answers are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.answers.len()
    }

    /// The key: the question after its ID, then the namespace (a marker byte
    /// keeps "no namespace" apart from an empty one). `false` if the question
    /// is not cacheable.
    fn fill_key(key: &mut Vec<u8>, question: &[u8], namespace: Option<&str>) -> bool {
        let Some(body) = question.get(2..) else {
            return false;
        };
        if question.len() > MAX_KEY_BYTES {
            return false;
        }
        key.clear();
        key.extend_from_slice(body);
        match namespace {
            Some(namespace) => {
                key.push(1);
                key.extend_from_slice(namespace.as_bytes());
            }
            None => key.push(0),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUESTION: &[u8] = b"\x12\x34rest-of-question";
    const RESPONSE: &[u8] = b"\x12\x34answer";

    #[test]
    fn a_repeated_question_gets_the_answer_with_its_own_id() {
        let mut cache = AnswerCache::default();
        cache.insert(7, QUESTION, Some("default"), RESPONSE);
        let again = b"\xab\xcdrest-of-question";
        assert_eq!(
            cache.get(7, again, Some("default")),
            Some(&b"\xab\xcdanswer"[..])
        );
    }

    #[test]
    fn another_namespace_or_none_is_another_question() {
        let mut cache = AnswerCache::default();
        cache.insert(1, QUESTION, Some("default"), RESPONSE);
        assert_eq!(cache.get(1, QUESTION, Some("other")), None);
        assert_eq!(cache.get(1, QUESTION, None), None);
        assert_eq!(cache.get(1, QUESTION, Some("")), None);
        cache.insert(1, QUESTION, None, b"\x12\x34none");
        assert_eq!(cache.get(1, QUESTION, None), Some(&b"\x12\x34none"[..]));
        assert_eq!(cache.get(1, QUESTION, Some("default")), Some(RESPONSE));
    }

    #[test]
    fn a_new_generation_forgets_every_answer() {
        let mut cache = AnswerCache::default();
        cache.insert(1, QUESTION, None, RESPONSE);
        assert_eq!(cache.get(2, QUESTION, None), None);
        assert_eq!(cache.len(), 0);
        // An answer worked out in an older generation is not kept either.
        cache.insert(1, QUESTION, None, RESPONSE);
        assert_eq!(cache.get(2, QUESTION, None), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut cache = AnswerCache::default();
        for i in 0..CAPACITY * 2 {
            let question = format!("\0\0question-{i}");
            cache.insert(1, question.as_bytes(), None, RESPONSE);
            assert!(cache.len() <= CAPACITY);
        }
    }

    #[test]
    fn short_and_oversized_questions_are_not_cached() {
        let mut cache = AnswerCache::default();
        cache.insert(1, b"\x01", None, RESPONSE);
        assert_eq!(cache.get(1, b"\x01", None), None);
        let long = vec![0u8; MAX_KEY_BYTES + 1];
        cache.insert(1, &long, None, RESPONSE);
        assert_eq!(cache.get(1, &long, None), None);
        assert_eq!(cache.len(), 0);
    }
}
