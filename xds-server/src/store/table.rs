//! One resource type's published resources, kept compact: each resource's
//! encoded body and aliases, once, plus a hash that is its version. The
//! `Resource` wrapper a client receives (name, version, type URL) is written
//! around it when a response or a snapshot is assembled.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use mesh_api::NetworkIp;
use mesh_api::prost::encoding::{
    WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint, key_len,
};

/// The field number of `resources` in `DeltaDiscoveryResponse`.
const RESOURCES_FIELD: u32 = 2;

// Field numbers of `envoy.service.discovery.v3.Resource` and `google.protobuf.Any`.
const RESOURCE_VERSION: u32 = 1;
const RESOURCE_BODY: u32 = 2;
const RESOURCE_NAME: u32 = 3;
const RESOURCE_ALIASES: u32 = 4;
const ANY_TYPE_URL: u32 = 1;
const ANY_VALUE: u32 = 2;

/// Length of a version string (16 hex digits).
const VERSION_LEN: usize = 16;

/// A published resource.
#[derive(Debug)]
pub(crate) struct Entry {
    /// A hash of the resource's encoding: its version, stable across restarts,
    /// so a reconnecting client that already has it is not sent it again.
    pub(crate) hash: u64,
    /// The encoded message (`Address` or `Authorization`), then its aliases as
    /// encoded `Resource.aliases` fields.
    blob: Box<[u8]>,
    /// Where the message ends in `blob`.
    value_len: u32,
}

impl Entry {
    /// The version string clients see.
    pub(crate) fn version(&self) -> String {
        version_string(self.hash)
    }

    /// The version as its 16 hex digits, without allocating.
    fn version_digits(&self) -> [u8; VERSION_LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; VERSION_LEN];
        for (index, digit) in digits.iter_mut().enumerate() {
            let shift = 4 * (VERSION_LEN - 1 - index);
            *digit = HEX[((self.hash >> shift) & 0xf) as usize];
        }
        digits
    }

    /// Whether a client's version string is this entry's (no allocation).
    pub(crate) fn has_version(&self, version: &str) -> bool {
        version.as_bytes() == self.version_digits()
    }

    fn value(&self) -> &[u8] {
        &self.blob[..self.value_len as usize]
    }

    fn encoded_aliases(&self) -> &[u8] {
        &self.blob[self.value_len as usize..]
    }

    /// The aliases, decoded.
    fn aliases(&self) -> Vec<String> {
        let mut aliases = Vec::new();
        let mut rest = self.encoded_aliases();
        while !rest.is_empty() {
            let (Ok(_), Ok(len)) = (decode_key(&mut rest), decode_varint(&mut rest)) else {
                break;
            };
            let len = usize::try_from(len).unwrap_or(usize::MAX).min(rest.len());
            let (alias, tail) = rest.split_at(len);
            aliases.push(String::from_utf8_lossy(alias).into_owned());
            rest = tail;
        }
        aliases
    }
}

/// The version string of a hash.
pub(crate) fn version_string(hash: u64) -> String {
    format!("{hash:016x}")
}

fn field_len(field: u32, len: usize) -> usize {
    key_len(field) + encoded_len_varint(len as u64) + len
}

fn put_field(field: u32, bytes: &[u8], dst: &mut BytesMut) {
    encode_key(field, WireType::LengthDelimited, dst);
    encode_varint(bytes.len() as u64, dst);
    dst.put_slice(bytes);
}

/// An alias (`"<network>/<ip>"`) as an index key: parsed, so the index holds
/// no strings of its own.
type AliasKey = (u32, IpAddr);

/// Resources of one type by name, and an index of their aliases.
#[derive(Debug)]
pub(crate) struct Table {
    type_url: &'static str,
    entries: BTreeMap<Arc<str>, Entry>,
    aliases: HashMap<AliasKey, Arc<str>>,
    /// Network names, numbered for the alias keys.
    networks: HashMap<Box<str>, u32>,
}

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upserted {
    Unchanged,
    Changed,
}

impl Table {
    pub(crate) fn new(type_url: &'static str) -> Self {
        Self {
            type_url,
            entries: BTreeMap::new(),
            aliases: HashMap::new(),
            networks: HashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The entry a client's name refers to: by resource name, else by alias.
    pub(crate) fn lookup(&self, name: &str) -> Option<(&Arc<str>, &Entry)> {
        if let Some(found) = self.entries.get_key_value(name) {
            return Some(found);
        }
        let alias: NetworkIp = name.parse().ok()?;
        let network = self.networks.get(alias.network.as_str())?;
        let canonical = self.aliases.get(&(*network, alias.ip))?;
        self.entries.get_key_value(canonical.as_ref())
    }

    /// Entries after `cursor` (all when `None`), in name order.
    pub(crate) fn after<'a>(
        &'a self,
        cursor: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Entry)> + 'a {
        use std::ops::Bound;
        let start = match cursor {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        self.entries.range::<str, _>((start, Bound::Unbounded))
    }

    /// How many bytes [`Table::frame`] writes for an entry.
    pub(crate) fn framed_len(&self, name: &str, entry: &Entry) -> usize {
        field_len(RESOURCES_FIELD, self.resource_len(name, entry))
    }

    fn resource_len(&self, name: &str, entry: &Entry) -> usize {
        let any = field_len(ANY_TYPE_URL, self.type_url.len())
            + field_len(ANY_VALUE, entry.value().len());
        field_len(RESOURCE_VERSION, VERSION_LEN)
            + field_len(RESOURCE_BODY, any)
            + field_len(RESOURCE_NAME, name.len())
            + entry.encoded_aliases().len()
    }

    /// Writes an entry as field 2 (`resources`) of a `DeltaDiscoveryResponse`:
    /// responses and snapshots are assembled by concatenating these.
    pub(crate) fn frame(&self, name: &str, entry: &Entry, dst: &mut BytesMut) {
        let value = entry.value();
        let any_len =
            field_len(ANY_TYPE_URL, self.type_url.len()) + field_len(ANY_VALUE, value.len());
        let resource_len = self.resource_len(name, entry);
        dst.reserve(field_len(RESOURCES_FIELD, resource_len));
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, dst);
        encode_varint(resource_len as u64, dst);
        put_field(RESOURCE_VERSION, &entry.version_digits(), dst);
        encode_key(RESOURCE_BODY, WireType::LengthDelimited, dst);
        encode_varint(any_len as u64, dst);
        put_field(ANY_TYPE_URL, self.type_url.as_bytes(), dst);
        put_field(ANY_VALUE, value, dst);
        put_field(RESOURCE_NAME, name.as_bytes(), dst);
        dst.put_slice(entry.encoded_aliases());
    }

    /// Publishes `value` (an encoded `Address` or `Authorization`) under `name`.
    pub(crate) fn upsert(&mut self, name: &str, value: &[u8], aliases: &[String]) -> Upserted {
        let hash = {
            let mut hasher = DefaultHasher::new();
            hasher.write(value);
            for alias in aliases {
                hasher.write(alias.as_bytes());
                hasher.write_u8(0);
            }
            hasher.finish()
        };
        if self
            .entries
            .get(name)
            .is_some_and(|entry| entry.hash == hash)
        {
            return Upserted::Unchanged;
        }
        // Exactly sized, so the buffer becomes `Bytes` without another allocation.
        let blob_len = value.len()
            + aliases
                .iter()
                .map(|alias| field_len(RESOURCE_ALIASES, alias.len()))
                .sum::<usize>();
        let mut blob = BytesMut::with_capacity(blob_len);
        blob.put_slice(value);
        for alias in aliases {
            put_field(RESOURCE_ALIASES, alias.as_bytes(), &mut blob);
        }
        let name: Arc<str> = match self.entries.get_key_value(name) {
            Some((existing, _)) => existing.clone(),
            None => name.into(),
        };
        let old = self.entries.insert(
            name.clone(),
            Entry {
                hash,
                blob: Vec::from(blob).into_boxed_slice(),
                value_len: u32::try_from(value.len()).unwrap_or(u32::MAX),
            },
        );
        if let Some(old) = old {
            self.forget_aliases(&name, &old);
        }
        for alias in aliases {
            if let Some(key) = self.alias_key(alias) {
                self.aliases.insert(key, name.clone());
            }
        }
        Upserted::Changed
    }

    /// Withdraws `name`; whether it was published.
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let Some((name, entry)) = self.entries.remove_entry(name) else {
            return false;
        };
        self.forget_aliases(&name, &entry);
        true
    }

    /// Drops the alias index entries of a resource that changed or went.
    fn forget_aliases(&mut self, name: &Arc<str>, entry: &Entry) {
        for alias in entry.aliases() {
            if let Some(key) = self.alias_key(&alias)
                && self.aliases.get(&key) == Some(name)
            {
                self.aliases.remove(&key);
            }
        }
    }

    /// The index key of an alias; `None` for one that is not `"<network>/<ip>"`
    /// (such aliases are published but not looked up).
    fn alias_key(&mut self, alias: &str) -> Option<AliasKey> {
        let alias: NetworkIp = alias.parse().ok()?;
        let next = u32::try_from(self.networks.len()).ok()?;
        let network = *self
            .networks
            .entry(alias.network.into_boxed_str())
            .or_insert(next);
        Some((network, alias.ip))
    }

    /// The name as stored (shared), for the change log.
    pub(crate) fn shared_name(&self, name: &str) -> Arc<str> {
        self.entries
            .get_key_value(name)
            .map_or_else(|| Arc::from(name), |(name, _)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::discovery::DeltaDiscoveryResponse;
    use mesh_api::prost::Message;

    use super::*;

    #[test]
    fn a_framed_entry_is_a_resource_field_of_a_response() {
        let mut table = Table::new(mesh_api::type_url::ADDRESS);
        let aliases = vec!["/10.0.0.1".to_owned(), "net/fd00::1".to_owned()];
        assert_eq!(
            table.upsert("uid-1", b"\x0a\x00", &aliases),
            Upserted::Changed
        );
        assert_eq!(
            table.upsert("uid-1", b"\x0a\x00", &aliases),
            Upserted::Unchanged
        );
        let entry = table.get("uid-1").expect("entry");
        let mut framed = BytesMut::new();
        table.frame("uid-1", entry, &mut framed);
        assert_eq!(framed.len(), table.framed_len("uid-1", entry));
        let response = DeltaDiscoveryResponse::decode(framed.freeze()).expect("decodes");
        let resource = &response.resources[0];
        assert_eq!(resource.name, "uid-1");
        assert_eq!(resource.version, entry.version());
        assert!(entry.has_version(&resource.version));
        assert_eq!(resource.aliases, aliases);
        let any = resource.resource.as_ref().expect("body");
        assert_eq!(any.type_url, mesh_api::type_url::ADDRESS);
        assert_eq!(any.value, b"\x0a\x00");
        assert_eq!(entry.aliases(), aliases);
        assert_eq!(
            table.lookup("/10.0.0.1").map(|(name, _)| &**name),
            Some("uid-1")
        );

        // A new version with other aliases: the old alias no longer resolves.
        table.upsert("uid-1", b"\x0a\x01", &aliases[..1]);
        assert!(table.lookup("net/fd00::1").is_none());
        assert!(table.remove("uid-1"));
        assert!(table.lookup("/10.0.0.1").is_none());
    }
}
