//! Token windows around chosen activations: the rows of one document at consecutive positions
//! around the example token, with the feature's activation on each (read from the pass' codes).

use loupe_store::{Bucket, Example};

use super::codes_file::CodesFile;

/// Token, document and position of every analysed row, in pass order.
#[derive(Clone, Debug, Default)]
pub struct RowInfo {
    pub doc: Vec<u32>,
    pub pos: Vec<u32>,
    pub token: Vec<u32>,
}

impl RowInfo {
    pub fn len(&self) -> usize {
        self.doc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.doc.is_empty()
    }

    /// Whether rows `r - 1` and `r` are neighbouring tokens of one document.
    fn follows(&self, r: usize) -> bool {
        r > 0 && self.doc[r] == self.doc[r - 1] && self.pos[r] == self.pos[r - 1].wrapping_add(1)
    }

    /// The rows of the window around `row`: up to `before` rows before it and the rest after, of
    /// `window` in all, without crossing a document (or a gap) boundary.
    pub fn window(&self, row: usize, window: usize) -> std::ops::Range<usize> {
        let after_max = window / 4;
        let before_max = window.saturating_sub(after_max + 1);
        let mut start = row;
        while row - start < before_max && self.follows(start) {
            start -= 1;
        }
        let mut end = row + 1;
        while end - start < window && end < self.len() && self.follows(end) {
            end += 1;
        }
        // Short on the right (document end): take more on the left.
        while end - start < window && self.follows(start) {
            start -= 1;
        }
        start..end
    }
}

/// Builds examples from the pass' rows and codes.
pub struct Windows<'a> {
    pub info: &'a RowInfo,
    pub codes: &'a CodesFile,
    /// Tokens per window.
    pub window: usize,
}

impl Windows<'_> {
    /// The example of feature `f` at `row` with activation `value`.
    pub fn example(&self, f: u32, rank: u16, value: f32, row: u64, bucket: Option<Bucket>) -> Example {
        let r = row as usize;
        let rows = self.info.window(r, self.window);
        Example {
            feature_id: f,
            rank,
            activation: value,
            row,
            doc: self.info.doc[r],
            pos: self.info.pos[r],
            center: (r - rows.start) as u16,
            tokens: self.info.token[rows.clone()].to_vec(),
            activations: rows.map(|t| self.codes.activation(t, f)).collect(),
            bucket,
        }
    }
}
