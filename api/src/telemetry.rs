//! Logs to stderr, and traces exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (with the standard `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_PROTOCOL` = `http/json` or
//! `http/protobuf`, and `OTEL_BSP_*` variables); off when it is not.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Keeps the exporter alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("warning: flushing traces failed: {error}");
            }
        }
    }
}

/// Installs the process-wide subscriber: `RUST_LOG`-filtered logs on stderr, plus OpenTelemetry
/// when configured. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    // The log filter applies to logs only: spans are exported whatever the log level says.
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(logs).try_init().context("installing the log subscriber")?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .with_context(|| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: cannot build the OTLP exporter"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "understudy".into());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("understudy");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::EnvFilter::new("info,sqlx=off,h2=off,hyper=off,reqwest=off"));
    tracing_subscriber::registry().with(logs).with(spans).try_init().context("installing the log and trace subscriber")?;
    Ok(Telemetry { provider: Some(provider) })
}
