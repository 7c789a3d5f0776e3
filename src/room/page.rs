//! What a waiter sees, made in memory (the origin never serves a waiting page): an accessible
//! HTML page for browsers, JSON for everything else.
//!
//! The page works without JavaScript (a meta refresh, and it says so). With JavaScript it polls
//! the JSON answer instead, updates an `aria-live` region rather than reloading (a reload sends
//! a screen reader back to the top), and has a button to pause the automatic updates (WCAG
//! 2.2.1 and 2.2.4).

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
}

pub fn json(s: &Status<'_>) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "{}".into())
}

/// `&`, `<`, `>`, `"` and `'` escaped: placeholders never become markup.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
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
    out
}

fn eta_text(eta: Option<[u64; 2]>) -> String {
    let minutes = |s: u64| s.div_ceil(60);
    match eta {
        None => "We cannot estimate the wait yet.".into(),
        Some([_, hi]) if hi > 3600 => "More than an hour.".into(),
        Some([lo, hi]) if hi < 60 => format!("About {lo} to {hi} seconds."),
        Some([lo, hi]) => match (minutes(lo), minutes(hi)) {
            (1, 1) => "About a minute.".into(),
            (a, b) if a == b => format!("About {a} minutes."),
            (a, b) => format!("About {a} to {b} minutes."),
        },
    }
}

/// The page, from the operator's template or the built-in one. Placeholders: `{{room}}`,
/// `{{state}}`, `{{position}}`, `{{ahead}}`, `{{eta}}`, `{{refresh}}`, all escaped.
pub fn html(s: &Status<'_>, template: Option<&str>) -> String {
    let position = s.position.map_or("-".into(), |p| p.to_string());
    let ahead = s.ahead.map_or("-".into(), |a| a.to_string());
    let state = match s.state {
        "queued" => "You are in line.",
        "refused" => {
            "Too many people joined from your network just now. Please try again in a minute."
        }
        "closed" => "This sale is closed to new shoppers.",
        other => other,
    };
    template
        .unwrap_or(PAGE)
        .replace("{{room}}", &escape(s.room))
        .replace("{{state}}", &escape(state))
        .replace("{{position}}", &escape(&position))
        .replace("{{ahead}}", &escape(&ahead))
        .replace("{{eta}}", &escape(&eta_text(s.eta_seconds)))
        .replace("{{refresh}}", &s.refresh_seconds.to_string())
}

const PAGE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{{refresh}}"></noscript>
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
<p class="note">Keep this page open: you keep your place, and you are let in automatically when it is your turn. Refreshing does not move you forward or back.</p>
<p class="note" id="how">This page checks your place every {{refresh}} seconds<span id="js-note"> by reloading itself</span>.</p>
<p><button type="button" id="pause" hidden aria-pressed="false">Pause automatic updates</button></p>
</main>
<script>
(function () {
  var paused = false, timer = null, every = {{refresh}} * 1000;
  var btn = document.getElementById("pause");
  document.getElementById("js-note").textContent = " without reloading";
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
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
