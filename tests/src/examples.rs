//! The examples of the documentation as tests run them: shell sessions (`$ command` lines,
//! each followed by what the terminal shows), Python snippets whose `print` lines carry
//! their output as a note, and JSON request/response pairs.
//!
//! How a shown output is compared with what a run prints:
//! - A session is a ```` ```sh ```` block whose lines start with `$ `; a command's output
//!   is the lines up to the next `$ ` line, standard output and error as a terminal
//!   interleaves them. A command continues on the next line after a trailing `\`.
//! - Two or more spaces and `# ` end a line with a note for the reader: neither command
//!   nor output (in a Python snippet, the note of a `print` line is what it prints).
//! - A line `…` stands for any lines, none included.
//! - Values that differ between machines and runs match by shape only: UUIDs, and the
//!   fields in [`VARYING`] wherever they appear (JSON keys, `key: value` lines, table
//!   columns under a header of capitals). A number matches any number.
//! - A JSON line is compared as JSON: a string `"…"` is any string, one ending in `…` any
//!   string that starts so, `{…}` any object, and `…` as the last element of an array any
//!   further elements.
//! - Runs of spaces are one separator (a table's columns are as wide as their values).

use serde_json::Value;

/// Fields whose values depend on the machine, the compiler or the moment.
pub const VARYING: &[&str] = &[
    // Time and load.
    "wall_us",
    "compile_ms",
    "loaded_at",
    "uptime_s",
    // The compiled plugins' bytes: a compiler version changes them.
    "size",
    "SIZE",
    "sha256",
    "stored_bytes",
    // Whoever runs the example.
    "owner_uid",
    "OWNER",
];

/// One `$ command` and the output shown after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub command: String,
    pub output: Vec<String>,
}

/// The shell sessions of a Markdown text, in order.
pub fn sessions(markdown: &str) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    for (lang, lines) in blocks(markdown) {
        if !matches!(lang.as_str(), "sh" | "console") || !lines.iter().any(|l| l.starts_with("$ "))
        {
            continue;
        }
        let mut steps: Vec<Step> = Vec::new();
        let mut continued = false;
        for line in lines {
            let line = without_note(&line);
            if continued {
                let step = steps.last_mut().expect("a command precedes");
                step.command.push('\n');
                step.command.push_str(line);
                continued = line.ends_with('\\');
            } else if let Some(command) = line.strip_prefix("$ ") {
                steps.push(Step {
                    command: command.to_string(),
                    output: Vec::new(),
                });
                continued = command.ends_with('\\');
            } else if let Some(step) = steps.last_mut() {
                step.output.push(line.to_string());
            }
        }
        out.push(steps);
    }
    out
}

/// The Python snippets of a Markdown text: (code, what its `print` lines print, from their
/// notes).
pub fn python_snippets(markdown: &str) -> Vec<(String, Vec<String>)> {
    blocks(markdown)
        .into_iter()
        .filter(|(lang, _)| lang == "python")
        .map(|(_, lines)| {
            let printed = lines
                .iter()
                .filter(|l| l.trim_start().starts_with("print("))
                .filter_map(|l| l.split_once("  # ").map(|(_, n)| n.trim().to_string()))
                .collect();
            (lines.join("\n") + "\n", printed)
        })
        .collect()
}

/// The C snippets whose first comment is the command that builds them: (command, code).
pub fn c_snippets(markdown: &str) -> Vec<(String, String)> {
    blocks(markdown)
        .into_iter()
        .filter(|(lang, lines)| lang == "c" && lines.first().is_some_and(|l| l.starts_with("/* ")))
        .map(|(_, lines)| {
            let mut command = String::new();
            for line in &lines {
                let part = line
                    .trim_start_matches("/* ")
                    .trim_start_matches(" * ")
                    .trim_end_matches("*/")
                    .trim();
                command.push_str(part.trim_end_matches('\\').trim());
                command.push(' ');
                if line.ends_with("*/") {
                    break;
                }
            }
            (command.trim().to_string(), lines.join("\n") + "\n")
        })
        .collect()
}

/// Each JSON request shown (a one-line ```` ```json ```` block starting `{"op"`) with the
/// response shown in the block right after it.
pub fn json_exchanges(markdown: &str) -> Vec<(String, String)> {
    let json: Vec<(String, Vec<String>)> = blocks(markdown);
    json.windows(2)
        .filter(|w| w[0].0 == "json" && w[1].0 == "json")
        .filter(|w| w[0].1.len() == 1 && w[0].1[0].starts_with("{\"op\""))
        .map(|w| (w[0].1[0].clone(), w[1].1.join("\n")))
        .collect()
}

/// Fenced blocks: (language, lines), blocks that follow each other kept adjacent.
fn blocks(markdown: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut open: Option<(String, Vec<String>)> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_string(), Vec::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, lines)), None) => lines.push(line.to_string()),
            (None, None) => {}
        }
    }
    out
}

fn without_note(line: &str) -> &str {
    match line.find("  # ") {
        Some(i) => line[..i].trim_end(),
        None => line.trim_end(),
    }
}

/// Whether `actual` (a run's output) is what `shown` shows; the error says where not.
pub fn compare(shown: &[String], actual: &str) -> Result<(), String> {
    let actual: Vec<&str> = actual.lines().map(str::trim_end).collect();
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    if sequence(&shown, &actual, &mut Vec::new()) {
        Ok(())
    } else {
        Err(format!(
            "shown:\n{}\nprinted:\n{}",
            shown.join("\n"),
            actual.join("\n")
        ))
    }
}

fn sequence<'a>(shown: &[&'a str], actual: &[&str], header: &mut Vec<&'a str>) -> bool {
    let Some((first, rest)) = shown.split_first() else {
        return actual.is_empty();
    };
    if *first == "…" {
        return (0..=actual.len()).any(|skip| sequence(rest, &actual[skip..], &mut header.clone()));
    }
    let Some((line, after)) = actual.split_first() else {
        return false;
    };
    let words: Vec<&str> = first.split_whitespace().collect();
    if words.len() >= 3
        && words
            .iter()
            .all(|w| w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    {
        *header = words;
    }
    line_matches(first, line, header) && sequence(rest, after, header)
}

/// One shown line against one printed line, under the table `header` in force.
pub fn line_matches(shown: &str, actual: &str, header: &[&str]) -> bool {
    if shown == actual {
        return true;
    }
    if shown.starts_with('{') {
        return match (shown_json(shown), serde_json::from_str::<Value>(actual)) {
            (Some(s), Ok(a)) => json_matches(&s, &a, None),
            _ => false,
        };
    }
    if let (Some((key, s)), Some((akey, a))) = (shown.split_once(": "), actual.split_once(": "))
        && key == akey
        && VARYING.contains(&key.trim())
    {
        return same_shape(s.trim(), a.trim());
    }
    let s: Vec<&str> = shown.split_whitespace().collect();
    let a: Vec<&str> = actual.split_whitespace().collect();
    s.len() == a.len()
        && s.iter().zip(&a).enumerate().all(|(i, (s, a))| {
            s == a
                || (is_uuid(s) && is_uuid(a))
                || header
                    .get(i)
                    .is_some_and(|column| VARYING.contains(column) && same_shape(s, a))
        })
}

fn same_shape(shown: &str, actual: &str) -> bool {
    if shown.parse::<f64>().is_ok() {
        actual.parse::<f64>().is_ok()
    } else {
        !actual.is_empty()
    }
}

/// A JSON text as shown, its `{…}` and trailing `…` array elements made strings that
/// [`json_matches`] reads as "anything of that kind".
pub fn shown_json(text: &str) -> Option<Value> {
    serde_json::from_str(&text.replace("{…}", "\"…{}\"").replace(",…]", ",\"…*\"]")).ok()
}

fn json_matches(shown: &Value, actual: &Value, key: Option<&str>) -> bool {
    use Value::*;
    if key.is_some_and(|k| VARYING.contains(&k)) {
        return std::mem::discriminant(shown) == std::mem::discriminant(actual);
    }
    match (shown, actual) {
        (String(s), Object(_)) => s == "…{}",
        (String(s), String(a)) => {
            s == a
                || (is_uuid(s) && is_uuid(a))
                || s.strip_suffix('…').is_some_and(|p| a.starts_with(p))
        }
        (Object(s), Object(a)) => {
            s.len() == a.len()
                && s.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| json_matches(v, av, Some(k))))
        }
        (Array(s), Array(a)) => match s.split_last() {
            Some((String(more), head)) if more == "…*" => {
                a.len() >= head.len() && head.iter().zip(a).all(|(s, a)| json_matches(s, a, None))
            }
            _ => s.len() == a.len() && s.iter().zip(a).all(|(s, a)| json_matches(s, a, None)),
        },
        _ => shown == actual,
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn sessions_split_commands_output_and_notes() {
        let md = "text\n```sh\n$ a --x 'y'   # a note\nout 1\nout 2  # why\n$ b \\\n  --c\n```\n```sh\nmake dev\n```\n";
        let s = sessions(md);
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0],
            [
                Step {
                    command: "a --x 'y'".into(),
                    output: lines("out 1\nout 2")
                },
                Step {
                    command: "b \\\n  --c".into(),
                    output: vec![]
                },
            ]
        );
    }

    #[test]
    fn what_varies_matches_by_shape_and_nothing_else_does() {
        let table =
            "NAME   OWNER  SIZE  EXECUTIONS\nup     alice  9823  3\n…\nlast   alice  1     0";
        assert!(compare(&lines(table), "NAME  OWNER  SIZE   EXECUTIONS\nup    root   10007  3\nx  root  5  1\nlast  root  2  0\n").is_ok());
        // Executions are not a varying column; nor may a line go missing.
        assert!(
            compare(
                &lines(table),
                "NAME OWNER SIZE EXECUTIONS\nup root 1 4\nlast root 1 0"
            )
            .is_err()
        );
        assert!(compare(&lines(table), "NAME OWNER SIZE EXECUTIONS\nup root 1 3").is_err());
        assert!(
            compare(
                &lines("3bb10552-5a5f-4049-b7a3-15113bc426c0"),
                "e976c477-6e61-4139-b158-bb3c1a9c175b\n"
            )
            .is_ok()
        );
        assert!(compare(&lines("2 3 14"), "2 3 15").is_err());
        assert!(compare(&lines("size: 9823\nname: up"), "size: 10\nname: up").is_ok());
        assert!(compare(&lines("size: 9823\nname: up"), "size: 10\nname: mine").is_err());
        let json = r#"{"ok":true,"tag":7,"binary":"3bb10552-5a5f-4049-b7a3-15113bc426c0","sha256":"…","stats":{…},"stages":[{…},…],"size":9823}"#;
        let run = r#"{"ok":true,"tag":7,"binary":"e976c477-6e61-4139-b158-bb3c1a9c175b","sha256":"ab","stats":{"wall_us":3},"stages":[{},{}],"size":1}"#;
        assert!(compare(&lines(json), run).is_ok());
        assert!(compare(&lines(json), &run.replace("\"tag\":7", "\"tag\":8")).is_err());
        assert!(compare(&lines(json), &run.replace("\"ok\":true,", "")).is_err());
    }

    #[test]
    fn python_prints_and_json_exchanges_are_found() {
        let md = "```python\nimport x\nprint(1)      # 1\n```\n```json\n{\"op\":\"list\"}\n```\n```json\n{\"ok\":true}\n```\n";
        assert_eq!(
            python_snippets(md),
            [("import x\nprint(1)      # 1\n".to_string(), lines("1"))]
        );
        let c = "```c\n/* cc -o x.wasm \\\n *    x.c */\nint x;\n```\n";
        assert_eq!(
            c_snippets(c),
            [(
                "cc -o x.wasm x.c".to_string(),
                "/* cc -o x.wasm \\\n *    x.c */\nint x;\n".to_string()
            )]
        );
        assert_eq!(
            json_exchanges(md),
            [("{\"op\":\"list\"}".to_string(), "{\"ok\":true}".to_string())]
        );
    }
}
