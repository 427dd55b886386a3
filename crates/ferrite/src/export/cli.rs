//! `ferrite export`: writes the telemetry of a data directory to a Parquet or
//! CSV file while no server runs on it.
//!
//! The command opens the store directly, which fails while a server holds
//! the store's directory lock; the error then points to the HTTP endpoint.
//! A file is written under a temporary name in the output's directory and
//! renamed to the output name once it is complete, so a failed or
//! interrupted export leaves no partial file and keeps an older file of
//! that name. An existing output that is no regular file, such as a named
//! pipe, is written directly.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};

use super::{ExportError, ExportPlan, ExportSummary, Format, TimeRange, parse_time_bound};
use crate::config::Config;
use crate::metadata::{MetadataStore, SqliteMetadata};
use crate::store::{EmbeddedStore, StoreError, TimeSeriesStore};

#[derive(clap::Args)]
pub struct ExportOptions {
    /// Start of the time range, inclusive: RFC 3339 (2024-05-06T00:00:00Z) or
    /// epoch milliseconds [default: the oldest point].
    #[arg(long)]
    start: Option<String>,
    /// End of the time range, exclusive: RFC 3339 or epoch milliseconds
    /// [default: no limit].
    #[arg(long)]
    end: Option<String>,
    /// Device name or id to export; repeat the option for several devices
    /// [default: every device].
    #[arg(long = "device", value_name = "NAME_OR_ID")]
    devices: Vec<String>,
    /// Comma-separated telemetry keys to export [default: every key].
    #[arg(long, value_delimiter = ',', value_name = "KEY,...")]
    keys: Vec<String>,
    /// Output format [default: from the extension of --output (.parquet, .pq
    /// or .csv); csv for standard output].
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Output file, or - for standard output. An existing file is replaced
    /// only when the export succeeds.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
}

/// Destination of an export.
enum Target {
    Stdout,
    File {
        path: PathBuf,
        /// The file being written, renamed to `path` on success. `None` when
        /// `path` exists and is no regular file (a named pipe, `/dev/null`),
        /// which is written directly.
        partial: Option<PathBuf>,
    },
}

/// Runs `ferrite export` on the data directory of `config`.
pub async fn run(config: &Config, options: ExportOptions) -> anyhow::Result<()> {
    let range = parse_range(&options)?;
    let keys = parse_keys(&options.keys)?;
    let (format, target) = choose_output(&options)?;
    if !format.is_supported() {
        bail!(ExportError::ParquetUnsupported);
    }

    let data_dir = &config.data_dir;
    check_data_dir(data_dir)?;
    let store = open_store(data_dir, &config.storage).await?;

    let metadata = SqliteMetadata::open(data_dir)
        .await
        .with_context(|| format!("cannot open the metadata in {}", data_dir.display()))?;
    let selected = select(&metadata, &options.devices).await;
    metadata.close().await;
    let (tenant, devices) = selected?;

    let plan = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            ExportPlan::build(store.as_ref(), tenant, devices, keys.as_deref(), range)
        })
        .await?
    };
    if !plan.missing_keys.is_empty() {
        eprintln!(
            "note: none of the selected devices has the key(s) {}",
            plan.missing_keys.join(", ")
        );
    }

    let summary = write_target(store, plan, format, &target).await?;
    print_summary(&summary, &target);
    Ok(())
}

fn parse_range(options: &ExportOptions) -> anyhow::Result<TimeRange> {
    let mut bounds = [None, None];
    for (slot, (name, text)) in bounds
        .iter_mut()
        .zip([("--start", &options.start), ("--end", &options.end)])
    {
        let Some(text) = text else { continue };
        let bound = parse_time_bound(name, text).map_err(anyhow::Error::msg)?;
        if bound.looks_like_seconds {
            eprintln!(
                "warning: {name} {text} looks like seconds; times are epoch milliseconds, so it means {}",
                chrono::DateTime::from_timestamp_nanos(bound.ns)
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            );
        }
        *slot = Some(bound.ns);
    }
    TimeRange::new(bounds[0], bounds[1]).map_err(anyhow::Error::msg)
}

/// Returns the requested keys, or `None` for every key.
fn parse_keys(keys: &[String]) -> anyhow::Result<Option<Vec<String>>> {
    if keys.is_empty() {
        return Ok(None);
    }
    let keys: Vec<String> = keys
        .iter()
        .map(|key| key.trim())
        .filter(|key| !key.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        bail!("--keys is empty: give a comma-separated list of keys, or leave it out for all keys");
    }
    Ok(Some(keys))
}

fn choose_output(options: &ExportOptions) -> anyhow::Result<(Format, Target)> {
    let path = &options.output;
    if path.as_os_str() == "-" {
        let format = options.format.unwrap_or(Format::Csv);
        if format == Format::Parquet && std::io::stdout().is_terminal() {
            bail!(
                "refusing to write Parquet to a terminal: redirect standard output to a file or pipe, or give --output FILE"
            );
        }
        return Ok((format, Target::Stdout));
    }

    let format = match (options.format, Format::from_extension(path)) {
        (Some(format), _) | (None, Some(format)) => format,
        (None, None) => bail!(
            "cannot tell the format from the output name {}: give --format parquet or --format csv, or use the extension .parquet or .csv",
            path.display()
        ),
    };
    if path.is_dir() {
        bail!(
            "--output {} is a directory: give a file name such as {}",
            path.display(),
            path.join(format!("export.{}", format.extension()))
                .display()
        );
    }
    let Some(file_name) = path.file_name() else {
        bail!(
            "--output {} has no file name: give a file name such as export.{}",
            path.display(),
            format.extension()
        );
    };
    let is_special_file = std::fs::metadata(path).is_ok_and(|metadata| !metadata.is_file());
    let partial = (!is_special_file).then(|| {
        path.with_file_name(format!(
            ".{}.{}.partial",
            file_name.to_string_lossy(),
            std::process::id()
        ))
    });
    Ok((
        format,
        Target::File {
            path: path.clone(),
            partial,
        },
    ))
}

fn check_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    if !data_dir.join("metadata.db").is_file() {
        bail!(
            "{} is not a Ferrite data directory (it has no metadata.db): pass the server's --data-dir or set FERRITE_DATA_DIR",
            data_dir.display()
        );
    }
    Ok(())
}

async fn open_store(
    data_dir: &Path,
    storage: &crate::config::StorageConfig,
) -> anyhow::Result<Arc<dyn TimeSeriesStore>> {
    let store_dir = data_dir.join("tsdb");
    // NOTE: the offline export opens the store without the tenant data
    // keys, so blocks sealed under `storage.encrypt` are skipped.
    let opened = {
        let store_dir = store_dir.clone();
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || EmbeddedStore::open(&store_dir, &storage)).await?
    };
    match opened {
        Ok(store) => Ok(Arc::new(store)),
        Err(StoreError::Locked { .. }) => bail!(
            "the store {} is locked: a ferrite server (or another export) is using this data directory. \
             Stop the server and run the export again, or export through the running server with \
             GET /api/v1/export (see docs/export.md)",
            store_dir.display()
        ),
        Err(error) => Err(error).context("cannot open the time-series store"),
    }
}

async fn select(
    metadata: &SqliteMetadata,
    requested: &[String],
) -> anyhow::Result<(crate::ids::TenantId, Vec<crate::metadata::Device>)> {
    let tenant = metadata.default_tenant().await?;
    let devices = super::select_devices(metadata, tenant.id, requested).await?;
    Ok((tenant.id, devices))
}

/// Runs the export into `target` on a blocking thread. Ctrl-C cancels it
/// between two pages of points.
async fn write_target(
    store: Arc<dyn TimeSeriesStore>,
    plan: ExportPlan,
    format: Format,
    target: &Target,
) -> anyhow::Result<ExportSummary> {
    let cancel = Arc::new(AtomicBool::new(false));
    let task = {
        let cancel = cancel.clone();
        let file = match target {
            Target::Stdout => None,
            Target::File { path, partial } => Some((path.clone(), partial.clone())),
        };
        // Opening a named pipe blocks until a reader opens it, so the file
        // is opened on the blocking thread too.
        tokio::task::spawn_blocking(move || -> anyhow::Result<ExportSummary> {
            let Some((path, partial)) = file else {
                let (summary, _) =
                    super::write_export(store.as_ref(), &plan, format, std::io::stdout(), &cancel)
                        .map_err(describe_failure)?;
                return Ok(summary);
            };
            let file = open_output(&path, partial.as_deref())?;
            let (summary, file) = super::write_export(store.as_ref(), &plan, format, file, &cancel)
                .map_err(describe_failure)?;
            if file.metadata()?.is_file() {
                file.sync_all()?;
            }
            Ok(summary)
        })
    };

    tokio::pin!(task);
    let result = tokio::select! {
        result = &mut task => result,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, Ordering::Relaxed);
            task.await
        }
    };
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => Err(anyhow::Error::new(error).context("the export task failed")),
    };

    match target {
        Target::Stdout => outcome.context("the export failed; its output is incomplete"),
        Target::File {
            path,
            partial: None,
        } => outcome.with_context(|| format!("the export to {} failed", path.display())),
        Target::File {
            path,
            partial: Some(partial),
        } => {
            let finished = outcome.and_then(|summary| {
                std::fs::rename(partial, path)
                    .context("cannot move the finished file into place")?;
                Ok(summary)
            });
            if finished.is_err() {
                let _ = std::fs::remove_file(partial);
            }
            finished.with_context(|| {
                format!(
                    "the export to {} failed; no file was written",
                    path.display()
                )
            })
        }
    }
}

fn describe_failure(error: ExportError) -> anyhow::Error {
    match error {
        ExportError::Cancelled => anyhow::anyhow!("interrupted"),
        other => other.into(),
    }
}

/// Opens the file that the export writes: a new partial file, or `path`
/// itself when there is no partial file.
fn open_output(path: &Path, partial: Option<&Path>) -> anyhow::Result<File> {
    let opened = match partial {
        Some(partial) => File::options().write(true).create_new(true).open(partial),
        None => File::options().write(true).open(path),
    };
    opened.with_context(|| {
        format!(
            "cannot write the output file {}: choose a writable location with --output",
            path.display()
        )
    })
}

fn print_summary(summary: &ExportSummary, target: &Target) {
    let destination = match target {
        Target::Stdout => "standard output".to_owned(),
        Target::File { path, .. } => path.display().to_string(),
    };
    eprintln!(
        "exported {} ({}, {}) to {destination}: {} in {:.2} s, {:.0} rows/s",
        count(summary.rows, "row"),
        count(summary.devices, "device"),
        count(summary.series, "series"),
        format_size(summary.bytes),
        summary.elapsed.as_secs_f64(),
        summary.rows_per_second(),
    );
    if summary.rows == 0 {
        eprintln!(
            "note: no points matched; check --start, --end, --device and --keys, and that the server was stopped after it stored the data"
        );
    }
}

/// Formats a count with its noun, adding "s" to the noun unless the count
/// is one or the noun ends in "s".
fn count(number: u64, noun: &str) -> String {
    let suffix = if number == 1 || noun.ends_with('s') {
        ""
    } else {
        "s"
    };
    format!("{number} {noun}{suffix}")
}

/// Formats a byte count exactly, with KiB, MiB or GiB for larger sizes.
fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, f64); 3] = [
        ("GiB", 1024.0 * 1024.0 * 1024.0),
        ("MiB", 1024.0 * 1024.0),
        ("KiB", 1024.0),
    ];
    for (unit, size) in UNITS {
        if bytes as f64 >= size {
            return format!("{bytes} bytes ({:.1} {unit})", bytes as f64 / size);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::super::testing::{ScriptedStore, plan};
    use super::*;

    fn file_target(dir: &Path) -> (PathBuf, Target) {
        let path = dir.join("export.csv");
        let partial = dir.join(".export.csv.partial");
        let target = Target::File {
            path: path.clone(),
            partial: Some(partial),
        };
        (path, target)
    }

    #[tokio::test]
    async fn failed_export_removes_partial_file_and_keeps_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (path, target) = file_target(dir.path());
        std::fs::write(&path, "older export").unwrap();
        let store: Arc<dyn TimeSeriesStore> = Arc::new(ScriptedStore {
            pages: AtomicUsize::new(3),
            fail: true,
        });
        let plan = plan(store.as_ref());

        let error = write_target(store, plan, Format::Csv, &target)
            .await
            .unwrap_err();

        let message = format!("{error:#}");
        assert!(message.contains("no file was written"), "{message}");
        assert!(message.contains("injected read failure"), "{message}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "older export");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("export.csv")]);
    }

    #[tokio::test]
    async fn finished_export_replaces_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, target) = file_target(dir.path());
        std::fs::write(&path, "older export").unwrap();
        let store: Arc<dyn TimeSeriesStore> = Arc::new(ScriptedStore {
            pages: AtomicUsize::new(2),
            fail: false,
        });
        let plan = plan(store.as_ref());

        let summary = write_target(store, plan, Format::Csv, &target)
            .await
            .unwrap();

        assert_eq!(summary.rows, 2 * super::super::PAGE_POINTS as u64);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count() as u64, summary.rows + 1);
        assert_eq!(summary.bytes, text.len() as u64);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn summary_counts_and_sizes() {
        assert_eq!(count(1, "device"), "1 device");
        assert_eq!(count(2, "device"), "2 devices");
        assert_eq!(count(2, "series"), "2 series");
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(3 * 1024 * 1024), "3145728 bytes (3.0 MiB)");
    }
}
