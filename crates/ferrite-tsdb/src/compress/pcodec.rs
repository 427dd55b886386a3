//! Pco (`pco` crate, format 1) as an inner coding for large integer and
//! float columns. The column stores pco's *wrapped* format: the file header,
//! one chunk and one page, without pco's own count, because the caller passes
//! the count to every decoder.

use pco::ChunkConfig;
use pco::PagingSpec;
use pco::data_types::Number;
use pco::wrapped::{FileCompressor, FileDecompressor};

use super::DecodeError;

/// Appends `values` as one pco chunk with a single page. Returns `None`
/// when pco rejects the input, which leaves `out` unchanged; the caller then
/// uses another mode.
pub(super) fn encode<T: Number>(values: &[T], out: &mut Vec<u8>) -> Option<()> {
    debug_assert!(!values.is_empty());
    let start = out.len();
    let config = ChunkConfig::default().with_paging_spec(PagingSpec::Exact(vec![values.len()]));

    let written = (|| {
        let file = FileCompressor::default();
        file.write_header(&mut *out)?;
        let mut chunk = file.chunk_compressor(values, &config)?;
        chunk.write_meta(&mut *out)?;
        chunk.write_page(0, &mut *out)?;
        Ok::<(), pco::errors::PcoError>(())
    })();

    if written.is_err() {
        out.truncate(start);
        return None;
    }
    Some(())
}

/// Decodes exactly `count` values from `input`, which must contain one
/// chunk with one page and nothing after it.
pub(super) fn decode<T: Number + Default>(
    input: &[u8],
    count: usize,
) -> Result<Vec<T>, DecodeError> {
    let invalid = |err: pco::errors::PcoError| DecodeError::new(format!("invalid pco data: {err}"));
    if count == 0 {
        return Err(DecodeError::new("pco mode used for an empty column"));
    }

    let (file, rest) = FileDecompressor::new(input).map_err(invalid)?;
    let (mut chunk, rest) = file.chunk_decompressor::<T, _>(rest).map_err(invalid)?;
    let mut page = chunk.page_decompressor(rest, count).map_err(invalid)?;
    let mut values = vec![T::default(); count];
    let progress = page.read(&mut values).map_err(invalid)?;
    if progress.n_processed != count || !progress.finished {
        return Err(DecodeError::new(format!(
            "pco page produced {} of {count} values",
            progress.n_processed
        )));
    }

    let rest = page.into_src();
    if !rest.is_empty() {
        return Err(DecodeError::new(format!(
            "{} unexpected bytes after the pco page",
            rest.len()
        )));
    }
    Ok(values)
}
