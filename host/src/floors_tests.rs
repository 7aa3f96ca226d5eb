//! The floors of `host/src` hold (see docs/architecture.md): read from the
//! source's own `crate::` paths, tests left out, every module imports only
//! modules on lower floors, or on its own floor where that floor allows it,
//! and no import circle exists. A failure names every import at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A floor: its name, whether its modules may import each other, and its
/// modules, from the bottom up. A module imports only below its floor.
const FLOORS: &[(&str, bool, &[&str])] = &[
    ("limits", false, &["limits"]),
    ("leaves", false, &["clock", "manifest", "perms", "schemas", "status"]),
    ("ports", false, &["bus", "state"]),
    ("services", false, &["contracts", "vault"]),
    ("runtime", false, &["runtime"]),
    ("core", true, &["deadlines", "envelope", "pipeline", "scheduler", "traces"]),
    (
        "adapters",
        false,
        &["admin", "gateway_backend", "http", "instance", "kafka", "logs", "metrics", "registry", "watch"],
    ),
    ("wiring", false, &["app"]),
];

/// The only imports between two adapters, and why each is one.
const ADAPTER_IMPORTS: &[(&str, &str, &str)] = &[
    ("admin", "kafka", "the admin API lists and replays dead letters (kafka::dlq)"),
    ("http", "metrics", "a component's port serves its /metrics"),
];

/// One import: `from` takes something of `to` at `at` (`path:line`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    at: String,
}

/// The module (first path segment under `src/`) a source file belongs to.
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
    first.unwrap_or_default().trim_end_matches(".rs").to_owned()
}

/// The code of `text` outside comments and `#[cfg(test)] mod … { … }`
/// blocks, line by line (1-based numbers kept). rustfmt closes such a block
/// with a `}` alone, indented as deep as the block opened.
fn production_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut skipping: Option<String> = None;
    let mut previous = "";
    for (number, line) in text.lines().enumerate() {
        if let Some(indent) = &skipping {
            if line.strip_prefix(indent.as_str()) == Some("}") {
                skipping = None;
            }
            continue;
        }
        let trimmed = line.trim_start();
        let test_module = previous.trim() == "#[cfg(test)]" && trimmed.contains("mod ");
        previous = line;
        if test_module && trimmed.ends_with('{') {
            skipping = Some(line[..line.len() - trimmed.len()].to_owned());
            continue;
        }
        let code = line.split("//").next().unwrap_or_default();
        lines.push((number + 1, code.to_owned()));
    }
    lines
}

/// The files of the modules that `text`, the file at `path`, declares for
/// tests only (`#[cfg(test)] mod name;`): `name.rs` or `name/` beside it.
fn test_modules(path: &Path, text: &str) -> Vec<std::path::PathBuf> {
    let base = match path.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs") {
        true => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        false => path.with_extension(""),
    };
    let mut files = Vec::new();
    let mut previous = "";
    for line in text.lines() {
        let declared =
            line.trim().split_once("mod ").filter(|(before, _)| before.is_empty() || before.starts_with("pub"));
        let declared = declared.map(|(_, name)| name);
        if let Some(name) = declared.and_then(|d| d.strip_suffix(';')).filter(|_| previous.trim() == "#[cfg(test)]") {
            files.push(base.join(format!("{name}.rs")));
            files.push(base.join(name));
        }
        previous = line;
    }
    files
}

/// The modules that the path after a `crate::` starts with: one, or each
/// of a `{a, b::c}` group's.
fn modules_named(after: &str) -> Vec<String> {
    let ident = |s: &str| s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let Some(group) = after.strip_prefix('{') else { return vec![ident(after)] };
    let (mut names, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            ',' | '}' if depth == 0 => {
                names.push(ident(&group[start..i]));
                start = i + 1;
                if c == '}' {
                    break;
                }
            }
            _ => {}
        }
    }
    names
}

/// Every import of another module by the production code of one file of
/// `module`, shown as `shown:line`.
fn imports_of(module: &str, shown: &str, text: &str) -> Vec<Import> {
    // Joined, so that a `crate::{…}` group spanning lines is read whole.
    let mut joined = String::new();
    let mut starts = Vec::new();
    for (number, code) in production_lines(text) {
        starts.push((joined.len(), number));
        joined.push_str(&code);
        joined.push('\n');
    }
    let mut imports = Vec::new();
    for (at, _) in joined.match_indices("crate::") {
        // `$crate::` and `other_crate::` are not this crate's paths.
        if joined[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let line = starts.iter().rev().find(|(start, _)| *start <= at).map_or(0, |(_, number)| *number);
        for to in modules_named(&joined[at + "crate::".len()..]) {
            if !to.is_empty() && to != module {
                imports.push(Import { from: module.to_owned(), to, at: format!("{shown}:{line}") });
            }
        }
    }
    imports
}

/// Every import of the production code under `src`.
fn imports_under(src: &Path) -> Vec<Import> {
    let mut files = Vec::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("cannot list {dir:?}: {err}")) {
            let path = entry.unwrap_or_else(|err| panic!("cannot list {dir:?}: {err}")).path();
            match path.is_dir() {
                true => pending.push(path),
                false if path.extension().is_some_and(|e| e == "rs") => files.push(path),
                false => {}
            }
        }
    }
    let texts: Vec<(std::path::PathBuf, String)> = files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {path:?}: {err}"));
            (path, text)
        })
        .collect();
    let tests: Vec<std::path::PathBuf> = texts.iter().flat_map(|(path, text)| test_modules(path, text)).collect();
    let mut imports = Vec::new();
    for (path, text) in &texts {
        let relative = path.strip_prefix(src).unwrap_or(path);
        let top = relative == Path::new("lib.rs") || relative == Path::new("main.rs");
        if top || tests.iter().any(|test| path.starts_with(test)) {
            continue;
        }
        let shown = Path::new("host/src").join(relative);
        imports.extend(imports_of(&module_of(relative), &shown.display().to_string(), text));
    }
    imports.sort();
    imports
}

/// The floor of `module`: its index from the bottom, its name, whether it
/// allows imports within.
fn floor_of(module: &str) -> Option<(usize, &'static str, bool)> {
    FLOORS.iter().enumerate().find(|(_, (_, _, modules))| modules.contains(&module)).map(|(i, (n, w, _))| (i, *n, *w))
}

/// What is wrong with `imports`, one line each, naming the import.
fn violations(imports: &[Import]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for import in imports {
        let (from, to) = (import.from.as_str(), import.to.as_str());
        let (Some((below, floor, within)), Some((target, target_floor, _))) = (floor_of(from), floor_of(to)) else {
            for unknown in [from, to].into_iter().filter(|m| floor_of(m).is_none()) {
                found.insert(format!(
                    "module {unknown:?} is on no floor: add it to FLOORS in host/src/floors_tests.rs and to docs/architecture.md"
                ));
            }
            continue;
        };
        let adapters = ADAPTER_IMPORTS.iter().any(|(a, b, _)| *a == from && *b == to);
        let wrong = match target.cmp(&below) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => !within && !adapters,
            std::cmp::Ordering::Greater => true,
        };
        if wrong {
            let how = match target == below {
                true => format!("both on floor {floor:?}, whose modules do not import each other"),
                false => format!("{from} is on floor {floor:?}, {to} above it on {target_floor:?}"),
            };
            found.insert(format!("{from} -> {to} at {} ({how})", import.at));
        }
    }
    found.extend(circles(imports));
    found.into_iter().collect()
}

/// Every import circle between modules, once each, as `a -> b -> a`.
fn circles(imports: &[Import]) -> Vec<String> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for import in imports {
        graph.entry(import.from.as_str()).or_default().insert(import.to.as_str());
    }
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for (&start, targets) in &graph {
        for &next in targets {
            // A path from `next` back to `start` closes a circle.
            let mut path = vec![start, next];
            let mut visited = BTreeSet::from([next]);
            if reaches(&graph, start, &mut path, &mut visited) {
                let members: BTreeSet<&str> = path.iter().copied().collect();
                if seen.insert(members) {
                    found.push(format!("circle: {}", path.join(" -> ")));
                }
            }
        }
    }
    found
}

/// Depth-first from the end of `path` to `goal`, leaving the way in `path`.
fn reaches<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    goal: &'a str,
    path: &mut Vec<&'a str>,
    visited: &mut BTreeSet<&'a str>,
) -> bool {
    let Some(&here) = path.last() else { return false };
    for &next in graph.get(here).into_iter().flatten() {
        if next == goal {
            path.push(next);
            return true;
        }
        if visited.insert(next) {
            path.push(next);
            if reaches(graph, goal, path, visited) {
                return true;
            }
            path.pop();
        }
    }
    false
}

#[test]
fn the_host_stands_on_its_floors_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let imports = imports_under(&src);
    assert!(imports.len() > 50, "too few imports read ({}): is the parser broken?", imports.len());
    let wrong = violations(&imports);
    assert!(wrong.is_empty(), "{} import(s) break the floors:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn the_check_names_what_breaks_the_floors() {
    let file = |path: &str, text: &str| imports_of(&module_of(Path::new(path)), path, text);
    let mut imports = file(
        "pipeline/mod.rs",
        "use crate::bus::Inbound;\nuse crate::{envelope::Envelope,\n    metrics::ComponentMetrics};\n\
         // crate::app is only named in a comment\n#[cfg(test)]\nmod tests {\n    use crate::app::run;\n}\n",
    );
    imports.extend(file("http.rs", "fn f(s: crate::kafka::ConsumerStatus) {}\n"));
    imports.extend(file("status/link.rs", "use crate::runtime::Stage;\n"));
    imports.extend(file("runtime/mod.rs", "let s = crate::status::Stages::default();\n"));
    imports.extend(file("kafka/mod.rs", "use crate::newcomer::Thing;\n"));
    imports.extend(file("admin.rs", "use crate::kafka::dlq::DeadLetters;\n"));
    let targets: Vec<(&str, &str)> = imports.iter().map(|i| (i.from.as_str(), i.to.as_str())).collect();
    assert_eq!(
        targets,
        [
            ("pipeline", "bus"),
            ("pipeline", "envelope"),
            ("pipeline", "metrics"),
            ("http", "kafka"),
            ("status", "runtime"),
            ("runtime", "status"),
            ("kafka", "newcomer"),
            ("admin", "kafka"),
        ],
        "comments and test modules are not read; groups are opened"
    );
    assert_eq!(imports[2].at, "pipeline/mod.rs:2", "where the group starts");
    let wrong = violations(&imports);
    let has = |text: &str| wrong.iter().any(|w| w.contains(text));
    assert!(has("pipeline -> metrics at pipeline/mod.rs:2 (pipeline is on floor \"core\""), "{wrong:#?}");
    assert!(has("http -> kafka at http.rs:1 (both on floor \"adapters\""), "{wrong:#?}");
    assert!(has("status -> runtime at status/link.rs:1"), "{wrong:#?}");
    assert!(has("circle: runtime -> status -> runtime"), "{wrong:#?}");
    assert!(has("module \"newcomer\" is on no floor"), "{wrong:#?}");
    assert!(!has("admin -> kafka") && !has("pipeline -> bus") && !has("pipeline -> envelope"), "{wrong:#?}");
    assert_eq!(wrong.len(), 5, "{wrong:#?}");
}
