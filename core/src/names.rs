//! The rule for user and group names, shared by the router (which enforces it) and the console
//! (which refuses a name longer than any can be before asking the router).

/// Longest name, in bytes (every allowed character is one byte).
pub const MAX_NAME_LEN: usize = 32;

/// The rule in words, for error messages.
pub const NAME_RULE: &str = "1-32 characters of A-Z, a-z, 0-9, '_', '-', '.' (not dots alone)";

/// `name` as names are compared whatever their case (user and group names are unique so):
/// its ASCII letters in lower case, the only letters a valid name has.
pub fn folded(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Whether `name` follows [`NAME_RULE`].
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.chars().all(|c| c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        assert!(is_valid_name("alice"));
        assert!(is_valid_name("a.b-c_9"));
        assert!(is_valid_name(&"x".repeat(MAX_NAME_LEN)));
        assert!(!is_valid_name(&"x".repeat(MAX_NAME_LEN + 1)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(".."));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("grüße"));
        // The rule in words names the same length.
        assert!(
            NAME_RULE.starts_with(&format!("1-{MAX_NAME_LEN} ")),
            "{NAME_RULE}"
        );
    }
}
