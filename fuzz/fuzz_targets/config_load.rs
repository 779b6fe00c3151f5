//! The config loader on arbitrary text: `load_plan_with_env` reads a file, so each input is
//! written to a scratch file (in /dev/shm when there is one) as TOML, YAML or JSON (byte 0
//! picks), and loaded with an empty environment. It must return a plan or an error, never panic;
//! an error must name something (its message is not empty).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("mqbridge-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let [which, text @ ..] = data else {
        return;
    };
    let extension = match which % 3 {
        0 => "toml",
        1 => "yaml",
        _ => "json",
    };
    let path = scratch_dir().join(format!("bridge.{extension}"));
    std::fs::write(&path, text).expect("write the scratch config");
    let env: [(&str, &str); 0] = [];
    if let Err(e) = mqbridge::config::load::load_plan_with_env(&path, env) {
        assert!(!e.to_string().trim().is_empty(), "an error without words");
    }
});
