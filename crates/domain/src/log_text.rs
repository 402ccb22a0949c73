//! Values taken from stream entries, cut to a bounded length for logs: an
//! entry may carry a megabyte in a field, a log line should not.

use std::borrow::Cow;

/// Characters of a value a log line keeps.
pub const LOGGED_CHARS: usize = 128;

/// `text` as a log line shows it: whole when it has at most
/// [`LOGGED_CHARS`] characters, else its first [`LOGGED_CHARS`] followed by
/// `…[N bytes]`, `N` its whole length.
pub fn for_log(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(LOGGED_CHARS) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!(
            "{}…[{} bytes]",
            text.get(..cut).unwrap_or_default(),
            text.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_stay_whole_and_long_ones_are_cut_with_their_length() {
        assert_eq!(for_log("u-1"), "u-1");
        let exactly = "x".repeat(LOGGED_CHARS);
        assert_eq!(for_log(&exactly), exactly.as_str());
        let long = "é".repeat(LOGGED_CHARS + 1);
        let shown = for_log(&long);
        assert_eq!(
            shown,
            format!("{}…[{} bytes]", "é".repeat(LOGGED_CHARS), long.len())
        );
    }
}
