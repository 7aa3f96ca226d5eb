//! The house stays one a newcomer can live in: outside tests, no function
//! of `host/src`, `gateway/src` or `bench/src` is longer than
//! [`MAX_FN_LINES`] lines and no source file is longer than
//! [`MAX_FILE_LINES`]. A failure names every function and file at fault.
//!
//! Test code is left out: files and directories whose name contains
//! `tests`, and in every other file all from the first line starting with
//! `#[cfg(test)]` on (where rustfmt'd code keeps its test module). A
//! function is measured from its `fn` line to the `}` that closes it at the
//! same indentation, as rustfmt writes it.

use std::path::{Path, PathBuf};

/// The source trees held to the limits, relative to the workspace root.
const ROOTS: &[&str] = &["host/src", "gateway/src", "bench/src"];

/// The longest a function outside tests may be, in lines.
const MAX_FN_LINES: usize = 80;

/// The longest a source file (other than a test file) may be, in lines.
const MAX_FILE_LINES: usize = 600;

/// A function with a body: its name, its `fn` line (1-based) and its length
/// in lines, the `fn` line and the closing brace included.
#[derive(Debug, PartialEq, Eq)]
struct Function {
    name: String,
    line: usize,
    lines: usize,
}

/// The name of the function whose `fn` line is `line`, if it is one: the
/// line, indentation aside, is `fn NAME` after any visibility (`pub`,
/// `pub(crate)`, `pub(in path)`) and qualifiers (`default`, `const`,
/// `async`, `unsafe`, `extern "ABI"`).
fn fn_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    if let Some(after) = rest.strip_prefix("pub") {
        rest = match after.strip_prefix('(') {
            Some(scope) => &scope[scope.find(')')? + 1..],
            None => after,
        };
        rest = rest.trim_start();
    }
    loop {
        let qualifier = ["default ", "const ", "async ", "unsafe ", "extern "].iter().find(|q| rest.starts_with(**q));
        let Some(qualifier) = qualifier else { break };
        rest = rest[qualifier.len()..].trim_start();
        if let Some(abi) = rest.strip_prefix('"') {
            rest = abi[abi.find('"')? + 1..].trim_start();
        }
    }
    let rest = rest.strip_prefix("fn ")?.trim_start();
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    let name = &rest[..end];
    name.starts_with(|c: char| c.is_alphabetic() || c == '_').then_some(name)
}

/// The functions with a body in `text` before its first line starting with
/// `#[cfg(test)]`, nested ones included (each measured on its own). A
/// signature may span lines; one that ends with `;` before any `{` (a trait
/// method's declaration) has no body and is left out.
///
/// # Errors
///
/// The `fn` line of a function whose closing brace is not found.
fn functions(text: &str) -> Result<Vec<Function>, String> {
    let lines: Vec<&str> = text.lines().take_while(|line| !line.starts_with("#[cfg(test)]")).collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let indent = &line[..line.len() - line.trim_start().len()];
        // The line that opens the body, unless the signature ends first.
        let Some(open) = (start..lines.len()).find(|&i| lines[i].contains('{') || lines[i].trim_end().ends_with(';'))
        else {
            return Err(format!("line {}: fn {name} has neither a body nor a `;`", start + 1));
        };
        if !lines[open].contains('{') {
            continue;
        }
        let one_line = {
            let opening = lines[open].trim_end();
            opening.ends_with('}') && opening.matches('{').count() == opening.matches('}').count()
        };
        let close = if one_line {
            Some(open)
        } else {
            (open + 1..lines.len()).find(|&i| lines[i].trim_end().strip_prefix(indent) == Some("}"))
        };
        let Some(close) = close else {
            return Err(format!("line {}: the closing brace of fn {name} is not found", start + 1));
        };
        found.push(Function { name: name.to_owned(), line: start + 1, lines: close - start + 1 });
    }
    Ok(found)
}

/// Every `.rs` file under `dir`, recursively, that is not test code: a file
/// or directory whose name contains `tests` is left out.
fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|err| panic!("cannot read {dir:?}: {err}"));
    for entry in entries {
        let path = entry.unwrap_or_else(|err| panic!("cannot read {dir:?}: {err}")).path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.contains("tests") {
            continue;
        }
        if path.is_dir() {
            sources(&path, found);
        } else if name.ends_with(".rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_function_over_80_lines_and_no_file_over_600_outside_tests() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for root in ROOTS {
        sources(&workspace.join(root), &mut files);
    }
    files.sort();
    assert!(files.len() > 50, "too few sources found under {ROOTS:?}: {}", files.len());
    let mut faults = Vec::new();
    for path in &files {
        let shown = path.strip_prefix(&workspace).unwrap_or(path).display().to_string();
        let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {path:?}: {err}"));
        let length = text.lines().count();
        if length > MAX_FILE_LINES {
            faults.push(format!("{shown}: {length} lines, over {MAX_FILE_LINES}"));
        }
        match functions(&text) {
            Ok(functions) => faults.extend(
                functions
                    .iter()
                    .filter(|f| f.lines > MAX_FN_LINES)
                    .map(|f| format!("{shown}:{}: fn {} is {} lines, over {MAX_FN_LINES}", f.line, f.name, f.lines)),
            ),
            Err(err) => faults.push(format!("{shown}:{err}")),
        }
    }
    assert!(
        faults.is_empty(),
        "split these along a concept (docs/architecture.md, \"The check that holds them\"):\n{}",
        faults.join("\n")
    );
}

#[test]
fn the_check_measures_every_kind_of_function() {
    let text = "\
pub(crate) async fn spans(
    a: u32,
) -> u32
where
    u32: Copy,
{
    fn nested() -> u32 {
        1
    }
    a + nested()
}

trait Port {
    fn declared(&self)
        -> u32;
    const fn one_line() -> u32 { 1 }
    pub(in crate::x) unsafe extern \"C\" fn qualified() {
        let s = \"{\";
    }
}

fn main_like() {}
#[cfg(test)]
fn counted_not() {
    1
}
";
    let measured = functions(text).unwrap();
    let shape: Vec<(&str, usize, usize)> = measured.iter().map(|f| (f.name.as_str(), f.line, f.lines)).collect();
    assert_eq!(
        shape,
        [("spans", 1, 11), ("nested", 7, 3), ("one_line", 16, 1), ("qualified", 17, 3), ("main_like", 22, 1)]
    );
    assert_eq!(fn_name("    let f: fn(u32) -> u32 = g;"), None);
    assert_eq!(fn_name("// fn commented() {"), None);
    assert!(functions("fn open() {\n    1\n").unwrap_err().contains("fn open"));
}
