//! Trace context across hops that are not calls: a webhook recorded then processed, an event
//! appended then relayed then projected then written to GitHub. The W3C `traceparent` of the span
//! that caused a thing is stored with it (delivery row, event metadata, NATS header, outbox row),
//! and the span that handles it later takes it as its parent.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of the current span, when tracing is exported and the span is sampled.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span that `traceparent` names (no-op for `None` or garbage).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// A span named `name`, child of `traceparent`.
pub fn span_from(name: &'static str, traceparent: Option<&str>) -> tracing::Span {
    let span = match name {
        "webhook.process" => tracing::info_span!("webhook.process"),
        "relay.publish" => tracing::info_span!("relay.publish"),
        "projector.apply" => tracing::info_span!("projector.apply"),
        "github.write" => tracing::info_span!("github.write"),
        _ => tracing::info_span!("understudy"),
    };
    set_parent(&span, traceparent);
    span
}
