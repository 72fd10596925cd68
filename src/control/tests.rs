//! The control protocol: commands, error replies, the socket's mode, line
//! bound and shutdown, against a real (small) device.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use crate::device::DeviceOptions;

fn device(dir: &Path) -> Device {
    let mut o = DeviceOptions::new(dir.join("disk.img"));
    o.image_options.create_size = Some(1 << 20);
    o.num_queues = 2;
    o.report = Some(dir.join("report.jsonl"));
    Device::open(&o).unwrap()
}

fn exec(dev: &Device, v: Value) -> Value {
    execute(dev, &v.to_string())
}

fn class(reply: &Value) -> &str {
    reply["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[test]
fn queries_answer_with_return_objects() {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let r = exec(&dev, json!({"execute": "query-stats", "id": 7}));
    assert_eq!(r["id"], 7, "the id is echoed");
    assert_eq!(r["return"]["requests"]["requests"], 0);
    assert_eq!(r["return"]["pins"]["inflight_pins"], 0);
    assert_eq!(r["return"]["events"]["conflicts"], 0);
    assert_eq!(r["return"]["queues"], json!([]), "no queue served yet");
    let r = exec(&dev, json!({"execute": "query-pins"}));
    assert_eq!(r["return"]["num_queues"], 2);
    assert_eq!(r["return"]["counters"]["pinned_pages"], 0);
    let r = exec(&dev, json!({"execute": "query-config"}));
    assert_eq!(r["return"]["policy"], "bounce");
    assert_eq!(r["return"]["bounce"], "conflicts");
    assert_eq!(r["return"]["on_mismatch"], "report");
    assert_eq!(r["return"]["num_queues"], 2);
    assert_eq!(r["return"]["checksums"], true);
    // A sparse image (wherever the temporary directory is): io_uring.
    assert_eq!(r["return"]["aio"], "io_uring");
    let r = exec(&dev, json!({"execute": "query-commands"}));
    assert_eq!(r["return"].as_array().unwrap().len(), COMMANDS.len());
    let r = exec(&dev, json!({"execute": "flush-report"}));
    assert!(r["return"]["path"]
        .as_str()
        .unwrap()
        .ends_with("report.jsonl"));
}

#[test]
fn settings_change_what_the_data_path_reads() {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let r = exec(
        &dev,
        json!({"execute": "set-policy", "arguments": {"policy": "passthrough", "bounce": "always"}}),
    );
    assert_eq!(r["return"]["policy"], "passthrough", "{r}");
    assert_eq!(dev.policy().policy, Policy::Passthrough);
    assert!(dev.policy().bounce_always);
    exec(
        &dev,
        json!({"execute": "set-policy", "arguments": {"policy": "stall"}}),
    );
    assert_eq!(dev.policy().policy, Policy::Stall);
    assert!(
        dev.policy().bounce_always,
        "bounce unchanged when not given"
    );

    let r = exec(
        &dev,
        json!({"execute": "set-on-mismatch", "arguments": {"on-mismatch": "eio"}}),
    );
    assert_eq!(r["return"]["on_mismatch"], "eio");
    assert_eq!(dev.on_mismatch(), OnMismatch::Eio);

    let r = exec(
        &dev,
        json!({"execute": "set-injection", "arguments": {"read-delay-ms": 20, "probability": 0.5}}),
    );
    assert_eq!(r["return"]["read_delay_ms"], 20.0);
    assert_eq!(dev.policy().read_delay, Some(Duration::from_millis(20)));
    assert_eq!(dev.policy().read_delay_probability, 0.5);
    exec(
        &dev,
        json!({"execute": "set-injection", "arguments": {"read-delay-ms": 0}}),
    );
    assert_eq!(dev.policy().read_delay, None);
}

#[test]
fn bad_requests_get_error_replies_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let before = dev.policy();
    for (line, want) in [
        ("garbage", "GenericError"),
        ("[1,2]", "GenericError"),
        ("{\"exec\":\"query-stats\"}", "GenericError"),
        ("{\"execute\":\"self-destruct\"}", "CommandNotFound"),
        (
            "{\"execute\":\"query-stats\",\"arguments\":[]}",
            "GenericError",
        ),
        (
            "{\"execute\":\"query-stats\",\"arguments\":{\"x\":1}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"set-policy\",\"arguments\":{\"policy\":\"yolo\"}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"set-policy\",\"arguments\":{\"policy\":\"fail\",\"bounce\":\"never\"}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"set-on-mismatch\",\"arguments\":{}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"set-injection\",\"arguments\":{\"read-delay-ms\":-1}}",
            "GenericError",
        ),
        (
            "{\"execute\":\"set-injection\",\"arguments\":{\"read-delay-ms\":5,\"probability\":2}}",
            "GenericError",
        ),
    ] {
        let r = execute(&dev, line);
        assert_eq!(class(&r), want, "{line}: {r}");
        assert!(!r["error"]["desc"].as_str().unwrap().is_empty());
    }
    assert_eq!(dev.policy(), before, "no bad request changed a setting");
    assert_eq!(dev.on_mismatch(), OnMismatch::Report);
}

#[test]
fn socket_is_0600_bounds_lines_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(device(dir.path()));
    let path = dir.path().join("ctl.sock");
    let server = ControlServer::start(dev.clone(), &path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut reply = |s: &mut UnixStream, bytes: &[u8]| -> Value {
        s.write_all(bytes).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    };
    // A huge line: one error, then the connection still works.
    let mut huge = vec![b'x'; 3 * MAX_LINE];
    huge.push(b'\n');
    let v = reply(&mut s, &huge);
    assert_eq!(class(&v), "GenericError");
    assert!(v["error"]["desc"].as_str().unwrap().contains("longer than"));
    let v = reply(&mut s, b"{\"execute\":\"query-config\"}\n");
    assert_eq!(v["return"]["policy"], "bounce");
    // Two requests in one write: two replies, in order.
    s.write_all(b"{\"execute\":\"query-pins\",\"id\":1}\n{\"execute\":\"nope\",\"id\":2}\n")
        .unwrap();
    let v = reply(&mut s, b"");
    assert_eq!(v["id"], 1);
    let v = reply(&mut s, b"");
    assert_eq!((v["id"].as_u64(), class(&v)), (Some(2), "CommandNotFound"));

    // The client side.
    let line = request_line(
        "set-policy",
        &["policy=fail".into(), "bounce=always".into()],
    )
    .unwrap();
    let v = send(&path, &line).unwrap();
    assert_eq!(v["return"]["policy"], "fail");
    assert_eq!(dev.policy().policy, Policy::Fail);
    assert!(matches!(
        request_line("set-policy", &["policy".into()]),
        Err(ControlError::BadArgument(_))
    ));
    let obj = request_line("set-injection", &["{\"read-delay-ms\":3}".into()]).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&obj).unwrap()["arguments"]["read-delay-ms"],
        3
    );

    drop(s);
    server.stop();
    assert!(!path.exists(), "the socket is removed at stop");
    assert_eq!(Arc::strong_count(&dev), 1, "the server released the device");
    assert!(matches!(
        send(&path, &line),
        Err(ControlError::Connect { .. })
    ));
}
