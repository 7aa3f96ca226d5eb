//! A guest's log lines and stderr made safe to print: control characters
//! escaped, cut to a bound, so that a guest can neither forge nor flood the
//! host's log.

/// Longest guest log message, and longest rendering of its fields, that is
/// printed; the rest is cut, with a marker saying how long it was.
pub const MAX_GUEST_TEXT: usize = 4096;

/// A guest's log message as printed: control characters escaped (a guest
/// cannot start a line of its own or colour the terminal), cut to
/// [`MAX_GUEST_TEXT`] bytes.
pub fn guest_message(message: &str) -> String {
    cut(escape_controls(message))
}

/// A guest's log fields as printed: `key="value"` pairs, values quoted and
/// escaped, keys escaped; cut to [`MAX_GUEST_TEXT`] bytes in all.
pub fn guest_fields(fields: &[(String, String)]) -> String {
    let simple = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    let rendered: Vec<String> = fields
        .iter()
        .map(|(k, v)| match simple(k) {
            true => format!("{k}={v:?}"),
            false => format!("{k:?}={v:?}"),
        })
        .collect();
    cut(rendered.join(" "))
}

fn escape_controls(text: &str) -> String {
    match text.chars().any(char::is_control) {
        false => text.to_owned(),
        true => {
            text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
        }
    }
}

/// `text` cut to [`MAX_GUEST_TEXT`] bytes at a character boundary, with a
/// marker naming its whole length.
fn cut(text: String) -> String {
    crate::limits::cut_text(text, MAX_GUEST_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_line_cannot_break_the_log() {
        assert_eq!(guest_message("paid"), "paid");
        assert_eq!(guest_message("two\nlines \u{1b}[31mred"), "two\\nlines \\u{1b}[31mred");
        let fields = guest_fields(&[("order_id".into(), "o-1".into()), ("bad key".into(), "a\"b\n".into())]);
        assert_eq!(fields, r#"order_id="o-1" "bad key"="a\"b\n""#);
    }

    #[test]
    fn a_long_guest_line_is_cut_with_a_marker() {
        let long = "é".repeat(5000);
        let printed = guest_message(&long);
        assert!(printed.len() < MAX_GUEST_TEXT + 40, "{}", printed.len());
        assert!(printed.ends_with("… [cut: 10000 bytes]"), "{}", &printed[printed.len() - 40..]);
        assert!(printed.starts_with("éé"));
        let fields = guest_fields(&[("k".into(), "x".repeat(10_000))]);
        assert!(fields.len() < MAX_GUEST_TEXT + 40 && fields.contains("[cut: "), "{}", fields.len());
        assert_eq!(guest_message(&"x".repeat(MAX_GUEST_TEXT)).len(), MAX_GUEST_TEXT, "the limit itself is kept");
    }
}
