//! `${NAME}` and `${NAME:-default}` in the config's string values, replaced from the
//! environment before parsing, so one file serves every environment and secrets stay out of it.
//! Only inside quoted strings: a `${` in a comment is left alone. An unset variable without a
//! default is an error that names it.

use std::ops::Range;

/// The text with every `${...}` inside a string replaced; on error the byte range of the
/// `${...}` and a message.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (Range<usize>, String)> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // The quote that opened the string we are in, if any.
    let mut quote: Option<u8> = None;
    let mut copied = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            None => match c {
                b'#' => {
                    // A comment runs to the end of the line.
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                b'"' | b'\'' => quote = Some(c),
                _ => {}
            },
            Some(q) => {
                if c == b'\\' && q == b'"' {
                    i += 2;
                    continue;
                }
                if c == q || c == b'\n' {
                    quote = None;
                } else if c == b'$' && b.get(i + 1) == Some(&b'{') {
                    let Some(len) = text[i..].find('}') else {
                        return Err((i..i + 2, "`${` without a closing `}`".into()));
                    };
                    let inner = &text[i + 2..i + len];
                    let (name, default) = match inner.split_once(":-") {
                        Some((n, d)) => (n, Some(d)),
                        None => (inner, None),
                    };
                    let valid = !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !valid {
                        return Err((
                            i..i + len + 1,
                            format!("invalid variable name {name:?} in `${{{inner}}}`"),
                        ));
                    }
                    let value = match (lookup(name), default) {
                        (Some(v), _) => v,
                        (None, Some(d)) => d.to_string(),
                        (None, None) => {
                            return Err((
                                i..i + len + 1,
                                format!(
                                    "environment variable {name} is not set (write \
                                     `${{{name}:-default}}` for a fallback)"
                                ),
                            ))
                        }
                    };
                    let escaped = if q == b'"' {
                        value.replace('\\', "\\\\").replace('"', "\\\"")
                    } else if value.contains('\'') || value.contains('\n') {
                        return Err((
                            i..i + len + 1,
                            format!("the value of {name} cannot go in a 'literal' string"),
                        ));
                    } else {
                        value
                    };
                    out.push_str(&text[copied..i]);
                    out.push_str(&escaped.replace('\n', "\\n"));
                    i += len + 1;
                    copied = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s\"3c".into()),
            "HOST" => Some("app".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_in_strings_only() {
        let t = "a = \"${TOKEN}\" # ${UNSET}\nb = 'x-${HOST}'\nc = \"${PORT:-3000}\"\n";
        assert_eq!(
            interpolate(t, env).unwrap(),
            "a = \"s\\\"3c\" # ${UNSET}\nb = 'x-app'\nc = \"3000\"\n"
        );
        let e = interpolate("x = \"${NOPE}\"", env).unwrap_err();
        assert_eq!(e.0, 5..12);
        assert!(e.1.contains("NOPE is not set"));
        assert!(interpolate("x = \"${bad-name}\"", env).is_err());
        assert!(interpolate("x = \"${OPEN\"", env).is_err());
    }
}
