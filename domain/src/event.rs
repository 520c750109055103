//! Events as they are stored: a versioned payload with the metadata that says who caused it.
//!
//! Stored form (`Recorded<E>` as JSON):
//! `{"schema_version": 1, "meta": {...}, "event": {"type": "DeploymentRequested", ...}}`.
//! Old schema versions are upcast when read ([`DomainEvent::upcast`]); stored events are never
//! rewritten. A type or version this build does not know is an error, never skipped.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

/// A past-tense fact of one aggregate type. The enum of an aggregate's events has one schema
/// version; change a variant's shape and you bump it and teach `upcast` the old shape.
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static {
    /// The schema version this build writes.
    const SCHEMA_VERSION: u32;

    /// The variant's name, as stored in the `type` field.
    fn event_type(&self) -> &'static str;

    /// Turns the JSON of an older schema version into the JSON of the current one.
    fn upcast(from_version: u32, event: serde_json::Value) -> Result<serde_json::Value, EventDecodeError> {
        let _ = event;
        Err(EventDecodeError::UnknownVersion { version: from_version, current: Self::SCHEMA_VERSION })
    }
}

/// Who or what caused an event, for audit and tracing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Everything one outside request caused shares this id (a webhook delivery, a mutation).
    pub correlation_id: Uuid,
    /// The event or request that directly caused this one, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// `user:<id>`, `github:<delivery>`, `system:<role>`, …
    pub actor: String,
    /// The W3C `traceparent` of the span that appended it, when traces are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Metadata {
    pub fn new(correlation_id: Uuid, actor: impl Into<String>) -> Self {
        Self { correlation_id, causation_id: None, actor: actor.into(), traceparent: None }
    }

    pub fn caused_by(mut self, causation_id: Uuid) -> Self {
        self.causation_id = Some(causation_id);
        self
    }
}

/// One stored event: the domain event with its metadata and schema version.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<E> {
    pub meta: Metadata,
    pub event: E,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventDecodeError {
    #[error(
        "event schema version {version} is not known to this build (it writes version {current}); upgrade Understudy or add an upcaster"
    )]
    UnknownVersion { version: u32, current: u32 },
    #[error("event does not match its schema: {0}")]
    Malformed(String),
}

#[derive(Serialize, Deserialize)]
struct StoredForm<T> {
    schema_version: u32,
    meta: Metadata,
    event: T,
}

impl<E: DomainEvent> Recorded<E> {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "schema_version": E::SCHEMA_VERSION,
            "meta": self.meta,
            "event": self.event,
        })
    }

    /// Decodes the stored form, upcasting older schema versions.
    pub fn from_json(value: serde_json::Value) -> Result<Self, EventDecodeError> {
        let stored: StoredForm<serde_json::Value> =
            serde_json::from_value(value).map_err(|e| EventDecodeError::Malformed(e.to_string()))?;
        let event = decode_event::<E>(stored.schema_version, stored.event)?;
        Ok(Self { meta: stored.meta, event })
    }
}

/// Decodes the `event` part of a stored event of the given schema version.
pub fn decode_event<E: DomainEvent>(version: u32, event: serde_json::Value) -> Result<E, EventDecodeError> {
    let current = if version == E::SCHEMA_VERSION {
        event
    } else if version < E::SCHEMA_VERSION {
        E::upcast(version, event)?
    } else {
        return Err(EventDecodeError::UnknownVersion { version, current: E::SCHEMA_VERSION });
    };
    serde_json::from_value(current).map_err(|e| EventDecodeError::Malformed(e.to_string()))
}

impl<E: DomainEvent> Serialize for Recorded<E> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredFormRef { schema_version: E::SCHEMA_VERSION, meta: &self.meta, event: &self.event }.serialize(serializer)
    }
}

impl<'de, E: DomainEvent> Deserialize<'de> for Recorded<E> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Self::from_json(value).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize)]
struct StoredFormRef<'a, T> {
    schema_version: u32,
    meta: &'a Metadata,
    event: &'a T,
}

#[cfg(test)]
mod tests {
    //! How a schema change is made: bump `SCHEMA_VERSION`, teach `upcast` the old shape, and keep
    //! a stored event of the old version in a test like this one (docs/event-schema.md).
    use super::*;

    /// Version 2 of an event whose version 1 called `preview_url` `url` and had no `attempt`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type")]
    enum Example {
        Ready { preview_url: String, attempt: u32 },
    }

    impl DomainEvent for Example {
        const SCHEMA_VERSION: u32 = 2;

        fn event_type(&self) -> &'static str {
            "Ready"
        }

        fn upcast(from_version: u32, mut event: serde_json::Value) -> Result<serde_json::Value, EventDecodeError> {
            match from_version {
                1 => {
                    let object = event.as_object_mut().ok_or_else(|| EventDecodeError::Malformed("not an object".into()))?;
                    let url = object.remove("url").ok_or_else(|| EventDecodeError::Malformed("v1 Ready without url".into()))?;
                    object.insert("preview_url".into(), url);
                    object.insert("attempt".into(), 1.into());
                    Ok(event)
                }
                other => Err(EventDecodeError::UnknownVersion { version: other, current: Self::SCHEMA_VERSION }),
            }
        }
    }

    #[test]
    fn old_stored_events_still_load_through_the_upcaster() {
        let stored_v1 = serde_json::json!({
            "schema_version": 1,
            "meta": { "correlation_id": "00000000-0000-0000-0000-000000000001", "actor": "system:test" },
            "event": { "type": "Ready", "url": "http://preview" }
        });
        let loaded = Recorded::<Example>::from_json(stored_v1).expect("v1 loads");
        assert_eq!(loaded.event, Example::Ready { preview_url: "http://preview".into(), attempt: 1 });
        // Written again, it is version 2; read back, it is the same event.
        let written = loaded.to_json();
        assert_eq!(written["schema_version"], 2);
        assert_eq!(Recorded::<Example>::from_json(written).expect("v2 loads"), loaded);
        // A version this build does not know is an error, never a guess.
        let future = serde_json::json!({
            "schema_version": 3,
            "meta": { "correlation_id": "00000000-0000-0000-0000-000000000001", "actor": "system:test" },
            "event": { "type": "Ready", "preview_url": "x", "attempt": 1, "region": "eu" }
        });
        assert_eq!(Recorded::<Example>::from_json(future), Err(EventDecodeError::UnknownVersion { version: 3, current: 2 }));
    }
}
