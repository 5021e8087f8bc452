//! Multi-tenancy with real UIDs: the access matrix (own, other's, public, admin) on every
//! op, quotas with per-user overrides, `busy` at the concurrency cap, fairness between
//! tenants, and who may connect at all.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

fn module_file(tmp: &TempDir, plugin: &str) -> String {
    let p = tmp.write(
        &format!("{plugin}.wasm"),
        &std::fs::read(plugin_path(plugin)).unwrap(),
    );
    p.to_str().unwrap().to_string()
}

fn json_of(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(o)))
}

#[test]
fn the_access_matrix_on_every_op() {
    let admins = TestGroup::create("wasmcore-e2e-admins");
    let alice = TestUser::create("wasmcore-e2e-alice");
    let bob = TestUser::create("wasmcore-e2e-bob");
    let mut carol = TestUser::create("wasmcore-e2e-carol");
    carol.groups = vec![admins.gid];
    let d = Daemon::start_config(
        &format!("[access]\nadmin_groups = [\"{}\"]\n", admins.name),
        &[],
    );
    let tmp = TempDir::new("matrix");
    let up = module_file(&tmp, "uppercase");
    let run = |who: &RunAs, args: &[&str]| d.ctl_with(args, None, Some(who));

    // Who the daemon thinks each one is: carol is an admin through a supplementary group.
    assert_eq!(
        json_of(&run(&carol, &["--json", "status"]))["tenant"]["admin"],
        json!(true)
    );
    assert_eq!(
        json_of(&run(&alice, &["--json", "status"]))["tenant"]["admin"],
        json!(false)
    );

    // Alice's private binary.
    let o = run(&alice, &["load", &up, "--name", "mine"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a_id = stdout(&o).trim().to_string();
    assert_eq!(
        run(&alice, &["execute", "mine", "--input", "a"]).stdout,
        b"A"
    );
    assert!(run(&alice, &["info", &a_id]).status.success());

    // Bob: not visible, not runnable, not removable; it looks absent.
    assert!(
        json_of(&run(&bob, &["--json", "list"]))["binaries"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    for args in [
        vec!["execute", a_id.as_str()],
        vec!["info", a_id.as_str()],
        vec!["unload", a_id.as_str()],
        vec!["execute", "mine"],
    ] {
        assert_eq!(run(&bob, &args).status.code(), Some(5), "bob {args:?}");
    }
    assert_eq!(run(&bob, &["list", "--all"]).status.code(), Some(4));
    let chain = run(&bob, &["chain", a_id.as_str(), a_id.as_str()]);
    assert_eq!(chain.status.code(), Some(5), "{}", stderr(&chain));

    // Non-admins cannot load public binaries or by path.
    assert_eq!(
        run(&alice, &["load", &up, "--public"]).status.code(),
        Some(4)
    );
    assert_eq!(
        err_code(&raw_as(
            &d.socket,
            &alice,
            &json!({"op": "load", "path": up})
        )),
        "forbidden"
    );

    // Carol (admin): sees and inspects everything, may run it, loads public binaries.
    let all = json_of(&run(&carol, &["--json", "list", "--all"]));
    assert!(
        all["binaries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["binary"] == json!(a_id))
    );
    assert!(run(&carol, &["info", &a_id]).status.success());
    assert_eq!(
        run(&carol, &["execute", &a_id, "--input", "c"]).stdout,
        b"C"
    );
    let o = run(&carol, &["load", &up, "--name", "shared", "--public"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p_id = stdout(&o).trim().to_string();
    ok(&raw_as(
        &d.socket,
        &carol,
        &json!({"op": "load", "path": up}),
    ));

    // Everyone may run a public binary, by UUID or by its name, and see it listed...
    for who in [&alice, &bob] {
        assert_eq!(
            run(who, &["execute", "shared", "--input", "x"]).stdout,
            b"X"
        );
        assert_eq!(
            run(who, &["chain", &p_id, "shared", "--input", "y"]).stdout,
            b"Y"
        );
        let listed = json_of(&run(who, &["--json", "list"]));
        assert!(
            listed["binaries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["binary"] == json!(p_id))
        );
        assert!(run(who, &["info", "shared"]).status.success());
        // ...but only admins may unload or configure it, and the refusal names both.
        let o = run(who, &["unload", &p_id]);
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        let o = run(who, &["configure", &p_id, "--config", "a=b"]);
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("only an admin may change or unload it"),
            "{}",
            stderr(&o)
        );
    }
    // Plugin state of a public binary is per tenant (counter): not shared.
    let counter = module_file(&tmp, "counter");
    assert!(
        run(&carol, &["load", &counter, "--name", "hits", "--public"])
            .status
            .success()
    );
    assert_eq!(
        run(&alice, &["execute", "hits", "--input", "k"]).stdout,
        b"1"
    );
    assert_eq!(
        run(&alice, &["execute", "hits", "--input", "k"]).stdout,
        b"2"
    );
    assert_eq!(run(&bob, &["execute", "hits", "--input", "k"]).stdout, b"1");

    // Admins unload anything, including another tenant's private binary.
    assert!(run(&carol, &["unload", &a_id]).status.success());
    assert_eq!(run(&alice, &["execute", &a_id]).status.code(), Some(5));
    assert!(run(&carol, &["unload", &p_id]).status.success());
    // The owner unloads its own.
    let o = run(&bob, &["load", &up, "--name", "b"]);
    assert!(o.status.success());
    assert!(run(&bob, &["unload", "b"]).status.success());
}

#[test]
fn quotas_with_per_user_overrides() {
    let alice = TestUser::create("wasmcore-e2e-qalice");
    let bob = TestUser::create("wasmcore-e2e-qbob");
    let config = format!(
        "[quotas]\nbinaries = 1\nconcurrent_executions = 2\n[quotas.users.{}]\nbinaries = 3\nmodule_bytes = 20000\n",
        alice.name
    );
    let d = Daemon::start_config(&config, &[]);
    let tmp = TempDir::new("quota");
    let up = module_file(&tmp, "uppercase"); // 9823 bytes
    let slug = module_file(&tmp, "transform"); // 12577 bytes
    let run = |who: &RunAs, args: &[&str]| d.ctl_with(args, None, Some(who));
    // Bob has the default: one binary.
    assert!(run(&bob, &["load", &up]).status.success());
    let o = run(&bob, &["load", &up]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("quota_exceeded"), "{}", stderr(&o));
    // Alice may hold three, but only 20000 bytes of modules.
    assert!(run(&alice, &["load", &up]).status.success());
    let o = run(&alice, &["load", &slug]);
    assert_eq!(o.status.code(), Some(7));
    assert!(stderr(&o).contains("bytes of modules"), "{}", stderr(&o));
    assert!(run(&alice, &["load", &up]).status.success());

    // Concurrency: two executions at once; the third is `busy` at once.
    let looper = tmp.write("loop.wasm", &fixture("loop.wat"));
    let o = run(&bob, &["--json", "list"]);
    let b_first = json_of(&o)["binaries"][0]["binary"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(run(&bob, &["unload", &b_first]).status.success());
    let o = run(&bob, &["load", looper.to_str().unwrap(), "--name", "spin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut long = Vec::new();
    for _ in 0..2 {
        let socket = d.socket.clone();
        let who = RunAs::clone(&bob);
        long.push(std::thread::spawn(move || {
            raw_as(
                &socket,
                &who,
                &json!({"op": "execute", "binary": "spin", "timeout_ms": 1500}),
            )
        }));
    }
    std::thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    let o = run(&bob, &["execute", "spin", "--timeout-ms", "1500"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("busy"), "{}", stderr(&o));
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "busy must not wait: {:?}",
        t.elapsed()
    );
    // Another tenant is not affected by bob's cap.
    assert_eq!(
        run(&alice, &["execute", "uppercase", "--input", "q"])
            .status
            .code(),
        Some(5)
    ); // not hers by that name
    for h in long {
        assert_eq!(err_code(&h.join().unwrap()), "timeout");
    }
    // Slots are released.
    let o = run(&bob, &["execute", "spin", "--timeout-ms", "100"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn one_tenant_flooding_long_executions_does_not_starve_another() {
    let flood = TestUser::create("wasmcore-e2e-flood");
    let quiet = TestUser::create("wasmcore-e2e-quiet");
    let d = Daemon::start_config("[quotas]\nconcurrent_executions = 4\n", &[]);
    let tmp = TempDir::new("fair");
    let looper = tmp.write("loop.wasm", &fixture("loop.wat"));
    assert!(
        d.ctl_with(
            &["load", looper.to_str().unwrap(), "--name", "spin"],
            None,
            Some(&flood)
        )
        .status
        .success()
    );
    let up = module_file(&tmp, "uppercase");
    assert!(
        d.ctl_with(&["load", &up, "--name", "up"], None, Some(&quiet))
            .status
            .success()
    );
    // The flooder fills its four slots with 3-second spins (four runaway guests on two cores)...
    let mut spins = Vec::new();
    for _ in 0..4 {
        let socket = d.socket.clone();
        let who = RunAs::clone(&flood);
        spins.push(std::thread::spawn(move || {
            raw_as(
                &socket,
                &who,
                &json!({"op": "execute", "binary": "spin", "timeout_ms": 3000}),
            )
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    // ...and asking for more gets `busy`.
    let o = d.ctl_with(&["execute", "spin"], None, Some(&flood));
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    // Meanwhile the other tenant's short executions keep answering promptly.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let o = d.ctl_with(
            &["execute", "up", "--input", &format!("n{i}")],
            None,
            Some(&quiet),
        );
        slowest = slowest.max(t.elapsed());
        assert_eq!(o.stdout, format!("N{i}").as_bytes(), "{}", stderr(&o));
    }
    // Each call includes starting wasmcorectl under setpriv; the spins run for 3 s.
    assert!(
        slowest < Duration::from_millis(1000),
        "a short execution waited {slowest:?} behind another tenant's spins"
    );
    for s in spins {
        assert_eq!(err_code(&s.join().unwrap()), "timeout");
    }
}

#[test]
fn only_allowed_users_may_connect() {
    let alice = TestUser::create("wasmcore-e2e-allowed");
    let bob = TestUser::create("wasmcore-e2e-denied");
    let d = Daemon::start_config(
        &format!("[access]\nallow_users = [\"{}\"]\n", alice.name),
        &[],
    );
    assert!(d.ctl_with(&["status"], None, Some(&alice)).status.success());
    let o = d.ctl_with(&["status"], None, Some(&bob));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("not allowed"), "{}", stderr(&o));
    // Root is an admin and always allowed.
    assert!(d.ctl(&["status"]).status.success());
}

/// A tenant's `status` counts what is its own (and the daemon's uptime); an admin's counts
/// every tenant's. A chain counts once per stage, as `metrics` and `list` count it.
#[test]
fn a_tenants_status_counts_its_own() {
    let alice = TestUser::create("wasmcore-e2e-salice");
    let bob = TestUser::create("wasmcore-e2e-sbob");
    let d = Daemon::start();
    let tmp = TempDir::new("status");
    let up = tmp.write("up.wasm", &std::fs::read(plugin_path("uppercase")).unwrap());
    let up = up.to_str().unwrap();
    let run = |who: &RunAs, args: &[&str]| d.ctl_with(args, None, Some(who));
    assert!(
        d.ctl(&["load", up, "--name", "pub", "--public"])
            .status
            .success()
    );
    for who in [&alice, &bob] {
        for name in ["a", "b"] {
            assert!(run(who, &["load", up, "--name", name]).status.success());
        }
    }
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..4 {
        assert!(
            run(&bob, &["execute", "a", "--input", "x"])
                .status
                .success()
        );
    }
    assert!(
        run(&alice, &["chain", "a", "b", "pub", "--input", "x"])
            .status
            .success()
    );
    let status = |who: Option<&RunAs>| {
        let o = d.ctl_with(&["--json", "status"], None, who);
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    // Her earlier connections close as their clients exit: give the worker a moment.
    let t = Instant::now();
    let a = loop {
        let a = status(Some(&alice));
        if a["connections"] == json!(1) || t.elapsed() > Duration::from_secs(3) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(a["binaries"], json!(3), "her two and the public one: {a}");
    assert_eq!(a["executions"], json!(3), "one chain of three stages: {a}");
    assert_eq!(a["connections"], json!(1), "this one: {a}");
    assert!(
        a["uptime_s"].as_u64().unwrap() >= 1,
        "the daemon's uptime, not her new worker's: {a}"
    );
    let b = status(Some(&bob));
    assert_eq!(b["executions"], json!(4), "{b}");
    let all = status(None);
    assert_eq!(all["binaries"], json!(5), "{all}");
    assert_eq!(all["executions"], json!(7), "{all}");
}

/// `OWNER/NAME` (OWNER a user name or a uid) reaches another tenant's binary by name: any
/// binary for admins, public ones for everyone. An admin's wrong name says what is not
/// there, never that it is hidden.
#[test]
fn owner_qualified_names_reach_what_the_caller_may_see() {
    let admins = TestGroup::create("wasmcore-e2e-qadmins");
    let alice = TestUser::create("wasmcore-e2e-qalice");
    let bob = TestUser::create("wasmcore-e2e-qbob");
    let mut carol = TestUser::create("wasmcore-e2e-qcarol");
    carol.groups = vec![admins.gid];
    let d = Daemon::start_config(
        &format!("[access]\nadmin_groups = [\"{}\"]\n", admins.name),
        &[],
    );
    let tmp = TempDir::new("qualified");
    let up = module_file(&tmp, "uppercase");
    let hash = module_file(&tmp, "hash");
    let run = |who: &RunAs, args: &[&str]| d.ctl_with(args, None, Some(who));
    for who in [&alice, &bob] {
        let o = run(who, &["load", &up, "--name", "a1"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = run(&carol, &["load", &hash, "--name", "shared", "--public"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a1 = format!("{}/a1", alice.name);
    let a1_by_uid = format!("{}/a1", alice.uid);
    let shared = format!("{}/shared", carol.name);

    // `list` names the owners as `OWNER/NAME` takes them.
    let listed = stdout(&run(&carol, &["list", "--all"]));
    assert!(
        listed
            .lines()
            .any(|l| l.contains(" a1 ") && l.contains(&alice.name)),
        "{listed}"
    );

    // The admin: another tenant's binary by user name or uid, in every op and in chains.
    assert_eq!(run(&carol, &["execute", &a1, "--input", "c"]).stdout, b"C");
    assert_eq!(
        run(&carol, &["execute", &a1_by_uid, "--input", "d"]).stdout,
        b"D"
    );
    let info: Value =
        serde_json::from_slice(&run(&carol, &["--json", "info", &a1]).stdout).unwrap();
    assert_eq!(info["owner_uid"], json!(alice.uid), "{info}");
    let o = run(&carol, &["chain", &a1, "shared", "--input", "x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&run(&carol, &["chain", "shared", "--input", "X"])),
        stdout(&o)
    );
    let o = run(&carol, &["configure", &a1, "--config", "k=v"]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "not an Extism plugin: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("kind process"), "{}", stderr(&o));
    // Two tenants' private binaries cannot share a chain: no worker holds both.
    let o = run(&carol, &["chain", &a1, &format!("{}/a1", bob.name)]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("one tenant's worker"), "{}", stderr(&o));

    // The admin's wrong names: what is not there, and where the name is.
    let o = run(&carol, &["info", "a1"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("no binary named \"a1\"")
            && e.contains(&a1)
            && e.contains(&format!("{}/a1", bob.name))
            && !e.contains("visible"),
        "{e}"
    );
    let o = run(&carol, &["unload", &format!("{}/a2", alice.name)]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{} (uid {}) has no binary named \"a2\"",
            alice.name, alice.uid
        )) && !e.contains("visible"),
        "{e}"
    );
    let o = run(&carol, &["info", "wasmcore-e2e-nosuchuser/a1"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no user named \"wasmcore-e2e-nosuchuser\""),
        "{}",
        stderr(&o)
    );
    let o = run(&carol, &["info", "/a1"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("OWNER/NAME"), "{}", stderr(&o));

    // A tenant: its own by its own name, public ones by their owner's, others' never.
    assert_eq!(run(&alice, &["execute", &a1, "--input", "a"]).stdout, b"A");
    let o = run(&bob, &["execute", &shared, "--input", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for reference in [a1.as_str(), a1_by_uid.as_str()] {
        let o = run(&bob, &["execute", reference, "--input", "b"]);
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
        // The error quotes the reference as written.
        assert!(
            stderr(&o).contains(&format!("no binary {reference:?} is visible to you")),
            "{}",
            stderr(&o)
        );
    }
    let o = run(&bob, &["chain", "a1", &format!("{a1}:run"), "--input", "b"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("stage 1 ({a1}:run): no binary {a1:?}")),
        "{}",
        stderr(&o)
    );
    let o = run(&bob, &["unload", &shared]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("binary {shared:?} is public")),
        "{}",
        stderr(&o)
    );
    // Bob's own `a1` is still his, and the admin unloads Alice's by name.
    assert_eq!(run(&bob, &["execute", "a1", "--input", "b"]).stdout, b"B");
    assert!(run(&carol, &["unload", &a1]).status.success());
    assert_eq!(run(&alice, &["execute", "a1"]).status.code(), Some(5));
    assert_eq!(run(&bob, &["execute", "a1", "--input", "b"]).stdout, b"B");
}
