//! What a waiter sees, made in memory (the origin never serves a waiting page): an accessible
//! HTML page for browsers, JSON for everything else.
//!
//! With JavaScript the page polls the JSON answer, updates an `aria-live` region rather than
//! reloading (a reload sends a screen reader back to the top), and has a button to pause the
//! automatic updates (WCAG 2.2.1 and 2.2.4).
//!
//! Without JavaScript it says that it does not update by itself and offers a link that turns a
//! meta refresh on (and, once on, one that turns it off; the room keeps the choice in a cookie,
//! `Room::refresh_choice`). An unasked-for timed refresh is what axe-core reports as critical
//! (WCAG 2.2.1, failure F41: the user cannot stop it); opted into, with a way out, it is the
//! user's own setting.

use std::fmt::Write;

use serde::Serialize;

/// What the waiter is told.
#[derive(Debug, Clone, Serialize)]
pub struct Status<'a> {
    pub room: &'a str,
    /// "queued", "refused" (no ticket: too many from this address), "closed" (reject mode).
    pub state: &'static str,
    pub position: Option<u64>,
    pub ahead: Option<u64>,
    pub eta_seconds: Option<[u64; 2]>,
    pub refresh_seconds: u64,
    pub token: Option<&'a str>,
    /// The page (without JavaScript) reloads itself: the waiter asked for it.
    #[serde(skip)]
    pub auto_refresh: bool,
    /// A waiter that stops polling loses its place after this long.
    #[serde(skip)]
    pub grace_seconds: u64,
}

pub fn json(s: &Status<'_>) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "{}".into())
}

/// The query parameter of the "reload automatically" links (`on` or `off`).
pub const REFRESH_PARAM: &str = "bw_room_refresh";

/// `&`, `<`, `>`, `"` and `'` escaped: placeholders never become markup.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

// The page is written straight into its buffer (`fmt::Write` on a `String` cannot fail):
// every waiter's poll fills it, and each value made as a `String` of its own was an
// allocation per poll.

fn seconds(out: &mut String, n: u64) {
    if n == 1 {
        out.push_str("second");
    } else {
        let _ = write!(out, "{n} seconds");
    }
}

fn eta_text(out: &mut String, eta: Option<[u64; 2]>) {
    let minutes = |s: u64| s.div_ceil(60);
    // Only digits and fixed words: nothing to escape.
    let _ = match eta {
        None => write!(out, "We cannot estimate the wait yet."),
        Some([_, hi]) if hi > 3600 => write!(out, "More than an hour."),
        Some([lo, hi]) if hi < 60 => write!(out, "About {lo} to {hi} seconds."),
        Some([lo, hi]) => match (minutes(lo), minutes(hi)) {
            (1, 1) => write!(out, "About a minute."),
            (a, b) if a == b => write!(out, "About {a} minutes."),
            (a, b) => write!(out, "About {a} to {b} minutes."),
        },
    };
}

fn number(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push('-'),
    }
}

/// A page template split once at its placeholders (`{{room}}`, `{{state}}`, `{{position}}`,
/// `{{ahead}}`, `{{eta}}`, `{{refresh}}`, and for pages without JavaScript `{{refresh_meta}}`,
/// the meta refresh when the waiter turned it on, and `{{nojs}}`, the sentence saying how the
/// page updates with its on/off link), so filling it is one pass of copies: the page is what
/// every waiter's poll costs.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    size: usize,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Room,
    State,
    Position,
    Ahead,
    Eta,
    Refresh,
    RefreshMeta,
    NoJs,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Field(Field),
}

const FIELDS: [(&str, Field); 8] = [
    ("{{room}}", Field::Room),
    ("{{state}}", Field::State),
    ("{{position}}", Field::Position),
    ("{{ahead}}", Field::Ahead),
    ("{{eta}}", Field::Eta),
    ("{{refresh}}", Field::Refresh),
    ("{{refresh_meta}}", Field::RefreshMeta),
    ("{{nojs}}", Field::NoJs),
];

impl Template {
    /// The operator's page, or the built-in one.
    pub fn new(text: Option<&str>) -> Template {
        let text = text.unwrap_or(PAGE);
        let mut parts = Vec::new();
        let mut rest = text;
        loop {
            let next = FIELDS
                .iter()
                .filter_map(|(name, f)| rest.find(name).map(|at| (at, *name, *f)))
                .min_by_key(|(at, _, _)| *at);
            let Some((at, name, field)) = next else {
                parts.push(Part::Text(rest.to_string()));
                break;
            };
            parts.push(Part::Text(rest[..at].to_string()));
            parts.push(Part::Field(field));
            rest = &rest[at + name.len()..];
        }
        Template {
            parts,
            size: text.len() + 256,
        }
    }

    /// The page for `s`, every value escaped.
    pub fn fill(&self, s: &Status<'_>) -> String {
        let state = match s.state {
            "queued" => "You are in line.",
            "refused" => {
                "Too many people joined from your network just now. Please try again in a minute."
            }
            "closed" => "This sale is closed to new shoppers.",
            other => other,
        };
        let mut out = String::with_capacity(self.size);
        let o = &mut out;
        for p in &self.parts {
            match p {
                Part::Text(t) => o.push_str(t),
                Part::Field(Field::Room) => escape_into(o, s.room),
                Part::Field(Field::State) => escape_into(o, state),
                Part::Field(Field::Position) => number(o, s.position),
                Part::Field(Field::Ahead) => number(o, s.ahead),
                Part::Field(Field::Eta) => eta_text(o, s.eta_seconds),
                Part::Field(Field::Refresh) => number(o, Some(s.refresh_seconds)),
                Part::Field(Field::RefreshMeta) if s.auto_refresh => {
                    let _ = write!(
                        o,
                        r#"<meta http-equiv="refresh" content="{}">"#,
                        s.refresh_seconds
                    );
                }
                Part::Field(Field::RefreshMeta) => {}
                Part::Field(Field::NoJs) if s.auto_refresh => {
                    o.push_str("This page reloads itself every ");
                    seconds(o, s.refresh_seconds);
                    let _ = write!(
                        o,
                        r#" to check your place, and lets you in when it is your turn. <a href="?{REFRESH_PARAM}=off">Stop reloading automatically</a>."#
                    );
                }
                Part::Field(Field::NoJs) => {
                    o.push_str(r#"JavaScript is off, so this page does not update by itself. <a href="">Check your place now</a>, at least once every "#);
                    seconds(o, s.grace_seconds);
                    let _ = write!(
                        o,
                        r#" to keep it, or <a href="?{REFRESH_PARAM}=on">reload automatically every "#
                    );
                    seconds(o, s.refresh_seconds);
                    o.push_str("</a>.");
                }
            }
        }
        out
    }
}

/// The page for `s` from `template` (or the built-in one), made on the spot (a room keeps a
/// `Template` instead).
pub fn html(s: &Status<'_>, template: Option<&str>) -> String {
    Template::new(template).fill(s)
}

const PAGE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript>{{refresh_meta}}</noscript>
<title>You are in line</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 36rem; margin: 3rem auto; padding: 0 1rem; color: #1a1a1a; background: #fff; line-height: 1.5; }
h1 { font-size: 1.6rem; }
.big { font-size: 2.2rem; font-weight: bold; }
button { font-size: 1rem; padding: 0.5rem 1rem; border: 2px solid #1a1a1a; background: #fff; color: #1a1a1a; border-radius: 4px; cursor: pointer; }
button:focus { outline: 3px solid #0b57d0; outline-offset: 2px; }
.note { color: #444; }
</style>
</head>
<body>
<main>
<h1>{{state}}</h1>
<div id="status" aria-live="polite">
<p>Your place in line: <span class="big" id="position">{{position}}</span></p>
<p>People ahead of you: <span id="ahead">{{ahead}}</span></p>
<p>Estimated wait: <span id="eta">{{eta}}</span></p>
</div>
<p class="note" id="how" hidden>Keep this page open: it checks your place every {{refresh}} seconds without reloading, and lets you in when it is your turn.</p>
<p class="note">Refreshing the page does not move you forward or back.</p>
<noscript><p class="note" id="nojs">{{nojs}}</p></noscript>
<p><button type="button" id="pause" hidden aria-pressed="false">Pause automatic updates</button></p>
</main>
<script>
(function () {
  var paused = false, timer = null, every = {{refresh}} * 1000;
  var btn = document.getElementById("pause");
  document.getElementById("how").hidden = false;
  btn.hidden = false;
  function eta(e) {
    if (!e) return "We cannot estimate the wait yet.";
    if (e[1] > 3600) return "More than an hour.";
    if (e[1] < 60) return "About " + e[0] + " to " + e[1] + " seconds.";
    return "About " + Math.ceil(e[0] / 60) + " to " + Math.ceil(e[1] / 60) + " minutes.";
  }
  function poll() {
    if (paused) return;
    fetch(location.href, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        var type = r.headers.get("content-type") || "";
        if (type.indexOf("application/json") < 0) { location.reload(); return null; }
        return r.json();
      })
      .then(function (s) {
        if (!s) return;
        if (s.state === "admitted") { location.reload(); return; }
        document.getElementById("position").textContent = s.position == null ? "-" : s.position;
        document.getElementById("ahead").textContent = s.ahead == null ? "-" : s.ahead;
        document.getElementById("eta").textContent = eta(s.eta_seconds);
      })
      .catch(function () {});
  }
  function start() { timer = setInterval(poll, every); }
  btn.addEventListener("click", function () {
    paused = !paused;
    btn.setAttribute("aria-pressed", paused ? "true" : "false");
    btn.textContent = paused ? "Resume automatic updates" : "Pause automatic updates";
    if (paused) { clearInterval(timer); } else { poll(); start(); }
  });
  start();
})();
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_escaped_and_every_one_is_filled() {
        let s = Status {
            room: "drop",
            state: "queued",
            position: Some(12),
            ahead: Some(11),
            eta_seconds: Some([40, 60]),
            refresh_seconds: 20,
            token: None,
            auto_refresh: false,
            grace_seconds: 60,
        };
        let page = html(
            &s,
            Some("<p>{{room}} {{position}} {{eta}}</p><i>{{state}}</i>"),
        );
        assert_eq!(
            page,
            "<p>drop 12 About a minute.</p><i>You are in line.</i>"
        );
        let built_in = html(&s, None);
        assert!(!built_in.contains("{{"), "unfilled placeholder");
        assert!(built_in.contains("aria-live=\"polite\""));
        assert!(built_in.contains("Pause automatic updates"));
        // Without JavaScript: no timed refresh unless the waiter asked for one, and a way out.
        assert!(!built_in.contains("http-equiv"));
        assert!(built_in.contains("bw_room_refresh=on"));
        let auto = html(
            &Status {
                auto_refresh: true,
                ..s.clone()
            },
            None,
        );
        assert!(auto.contains(r#"<noscript><meta http-equiv="refresh" content="20"></noscript>"#));
        assert!(auto.contains("bw_room_refresh=off"));
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
