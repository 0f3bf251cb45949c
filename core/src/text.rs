//! What a line of text shown to other users may not hold: characters that change how the
//! line reads instead of being read (line breaks, terminal escapes, invisible and directional
//! marks). The router refuses them where a line is promised (a status); the console escapes
//! them in whatever it prints.

/// Whether `c` is a control character (a line break, a tab, a terminal escape) or a
/// separator or format character that is invisible or reorders what follows: the line and
/// paragraph separators, zero-width spaces and marks, directional marks, embeddings,
/// overrides and isolates, the word joiner and its kin, the byte-order mark, the soft hyphen.
/// The zero-width joiner and non-joiner are not among them: emoji sequences and several
/// scripts need them.
pub fn is_control_or_format(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'
                | '\u{200e}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_that_change_how_a_line_reads_are_caught_and_text_is_not() {
        for c in [
            '\n', '\t', '\u{1b}', '\u{2028}', '\u{202e}', '\u{2066}', '\u{200b}', '\u{feff}',
        ] {
            assert!(is_control_or_format(c), "{c:?}");
        }
        for c in ['a', 'é', 'ש', '中', '\u{200d}', '\u{200c}', '👍', ' '] {
            assert!(!is_control_or_format(c), "{c:?}");
        }
    }
}
