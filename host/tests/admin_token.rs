//! The command line never takes the admin token as an argument (every user
//! sees arguments in `ps`): `--token` and `--admin-token` are refused with
//! where it goes instead, and a token file is read.

use std::process::Command;

fn host(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_host"))
        .args(args)
        .env_remove("HOST_ADMIN_TOKEN")
        .env_remove("HOST_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_token_given_as_an_argument_is_refused() {
    let token = "an-admin-token-of-some-length";
    for args in
        [&["reload", "payment", "--token", token][..], &["run", "--manifest", "missing.toml", "--admin-token", token]]
    {
        let (ok, stderr) = host(args);
        assert!(!ok, "{args:?}");
        assert!(stderr.contains("not accepted as an argument") && stderr.contains("HOST_ADMIN_TOKEN"), "{stderr}");
        assert!(!stderr.contains(token), "the token is not echoed: {stderr}");
    }
}

#[test]
fn reload_reads_the_token_from_a_file() {
    let dir = std::env::temp_dir().join(format!("admin-token-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "an-admin-token-of-some-length\n").unwrap();
    let file = file.display().to_string();
    // Nothing listens on port 9: the token was read, the host not reached.
    let (ok, stderr) = host(&["reload", "payment", "--token-file", &file, "--admin-url", "http://127.0.0.1:9"]);
    assert!(!ok && stderr.contains("cannot reach the admin API"), "{stderr}");
    let (ok, stderr) = host(&["reload", "payment", "--admin-url", "http://127.0.0.1:9"]);
    assert!(!ok && stderr.contains("no admin token"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
