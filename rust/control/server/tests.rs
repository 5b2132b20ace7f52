//! The I/O thread through a real socket: a DEALER client, and a thread acting as the Python
//! worker of the data lanes.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::{ManualClock, MonotonicClock};
use crate::control::{ControlConfig, ControlPlane};
use crate::hash::ChainMemo;
use crate::index::{L1Config, L1Index};

fn row(name: &str, id: i64, nargs: usize, route: Route, sheddable: bool) -> OpRow {
    OpRow { name: name.into(), legacy_id: Some(id), nargs, route, fallback: codec::uint(0), sheddable }
}

fn table() -> Vec<OpRow> {
    vec![
        row("store", 6, 1, Route::Affinity, true),
        row("lookup", 8, 2, Route::Native(Native::Lookup), true),
        row("query_prefetch_status", 9, 1, Route::Native(Native::QueryPrefetchStatus), true),
        row("wait_prefetch_status", 10, 2, Route::Native(Native::WaitPrefetchStatus), true),
        row("ping", 22, 1, Route::Native(Native::Ping), true),
        row("noop", 24, 0, Route::Native(Native::Noop), true),
        row("report_block_allocation", 23, 0, Route::Normal, true),
        row("cb_register_rope", 25, 0, Route::Refused("not here".into()), true),
    ]
}

struct Fx {
    srv: Arc<Server>,
    client: zmq::Socket,
    _ctx: zmq::Context,
}

fn fx(max_pending: usize, clock: Arc<dyn Clock>) -> Fx {
    let index = Arc::new(L1Index::new(L1Config::new(1 << 20)).unwrap());
    let cfg = ControlConfig { chunk_size: 16, l2_prefetch: false, prefetch_queue: 4 };
    let cp = Arc::new(ControlPlane::new(
        cfg,
        index,
        Arc::new(ChainMemo::new(64)),
        Arc::new(MonotonicClock::new()),
    ));
    let scfg = ServerConfig {
        url: "tcp://127.0.0.1:0".into(),
        ipv6: false,
        max_message_bytes: 1 << 20,
        max_pending,
        affinity_lanes: 2,
    };
    let srv = Arc::new(Server::bind(cp, scfg, table(), clock).unwrap());
    srv.start().unwrap();
    let ctx = zmq::Context::new();
    let client = ctx.socket(zmq::DEALER).unwrap();
    client.set_rcvtimeo(10_000).unwrap();
    client.connect(srv.url()).unwrap();
    Fx { srv, client, _ctx: ctx }
}

impl Fx {
    fn send(&self, frames: &[&[u8]]) {
        self.client.send_multipart(frames.iter().copied(), 0).unwrap();
    }

    fn recv(&self) -> Vec<Vec<u8>> {
        self.client.recv_multipart(0).expect("a reply")
    }

    fn call(&self, frames: &[&[u8]]) -> Vec<Vec<u8>> {
        self.send(frames);
        self.recv()
    }
}

fn error_code(reply: &[Vec<u8>]) -> String {
    assert_eq!(reply.len(), 4, "an error reply has 4 frames: {reply:?}");
    let body = String::from_utf8_lossy(&reply[3]).to_string();
    ["bad_frame", "unknown_op", "unsupported_op", "bad_request", "overloaded", "shutting_down", "internal"]
        .iter()
        .find(|c| body.contains(*c))
        .map_or(body.clone(), |c| c.to_string())
}

#[test]
fn control_ops_are_answered_on_the_io_thread() {
    let f = fx(16, Arc::new(MonotonicClock::new()));
    let uid = codec::uint(1);
    assert_eq!(
        f.call(&[&uid, &codec::string("noop")]),
        vec![uid.clone(), codec::string("noop"), codec::string("OK")]
    );
    assert_eq!(f.call(&[&uid, &[24]])[2], codec::string("OK"), "by legacy id");
    assert_eq!(f.call(&[&uid, &codec::string("ping"), &codec::nil()])[2], codec::boolean(true));
    assert_eq!(
        f.call(&[&uid, &codec::string("ping"), &[5]])[2],
        codec::boolean(false),
        "unknown instance: false once"
    );
    assert_eq!(f.call(&[&uid, &codec::string("ping"), &[5]])[2], codec::boolean(true));
    assert_eq!(
        f.call(&[&uid, &codec::string("query_prefetch_status"), &codec::string("r")])[2],
        codec::uint(0)
    );
    // The loop counts a reply after handing it to the socket: wait for the last count.
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.srv.io_status().replies_sent < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let st = f.srv.io_status();
    assert!(st.alive);
    assert_eq!(st.requests_received, 6);
    assert_eq!(st.replies_sent, 6);
    let t = f.srv.timings();
    assert!(t.iter().any(|(n, t)| n == "noop" && t.count == 2));
}

#[test]
fn every_bad_request_gets_an_error_reply() {
    let f = fx(16, Arc::new(MonotonicClock::new()));
    let uid = codec::uint(7);
    assert_eq!(error_code(&f.call(&[&uid])), "bad_frame");
    assert_eq!(error_code(&f.call(&[&uid, &[0xc1]])), "bad_frame");
    assert_eq!(error_code(&f.call(&[&uid, &codec::string("nope")])), "unknown_op");
    assert_eq!(error_code(&f.call(&[&uid, &[99]])), "unknown_op");
    assert_eq!(error_code(&f.call(&[&uid, &codec::string("cb_register_rope")])), "unsupported_op");
    assert_eq!(error_code(&f.call(&[&uid, &codec::string("noop"), &[1]])), "bad_request");
    assert_eq!(error_code(&f.call(&[&uid, &codec::string("ping"), &codec::string("x")])), "bad_request");
    assert_eq!(error_code(&f.call(&[&uid, &codec::string("lookup"), &[0x90], &[1]])), "bad_request");
    let r = f.call(&[&uid, &codec::string("lookup"), &[0x90], &[1]]);
    assert_eq!(r[2], codec::uint(0), "the op's fallback payload");
    assert_eq!(f.srv.control().counters.get(&["request_errors", "bad_request"]), 4);
    // Still serving.
    assert_eq!(f.call(&[&uid, &codec::string("noop")])[2], codec::string("OK"));
}

#[test]
fn data_ops_go_to_python_lanes_and_back_in_order() {
    let f = fx(16, Arc::new(MonotonicClock::new()));
    let srv = f.srv.clone();
    let worker = std::thread::spawn(move || {
        let mut served = 0;
        while served < 3 {
            for lane in 0..srv.lanes() {
                if let Some(req) = srv.next(lane, Duration::from_millis(20)) {
                    let name = srv.ops()[req.row].name.clone();
                    let payload = [name.as_bytes(), &req.args.concat()].concat();
                    assert!(srv.reply(&req, vec![req.uid.clone(), req.op_frame.clone(), payload], None));
                    assert!(!srv.reply(&req, vec![], None), "answered once");
                    served += 1;
                }
            }
        }
    });
    for i in 0..2u8 {
        f.send(&[&[i], &codec::string("store"), &[i]]);
    }
    f.send(&[&[9], &codec::string("report_block_allocation")]);
    let mut got: Vec<Vec<Vec<u8>>> = (0..3).map(|_| f.recv()).collect();
    worker.join().unwrap();
    got.sort();
    assert_eq!(got[0][2], b"store\x00".to_vec());
    assert_eq!(got[1][2], b"store\x01".to_vec());
    assert_eq!(got[2][2], b"report_block_allocation".to_vec());
    assert_eq!(f.srv.io_status().pending_requests, 0);
}

#[test]
fn a_dropped_request_is_answered_internal_and_overload_is_refused() {
    let f = fx(1, Arc::new(MonotonicClock::new()));
    f.send(&[&[1], &codec::string("store"), &[1]]);
    // The second store finds one pending: overloaded at once.
    assert_eq!(error_code(&f.call(&[&[2], &codec::string("store"), &[2]])), "overloaded");
    let req = (0..f.srv.lanes()).find_map(|l| f.srv.next(l, Duration::from_millis(50))).expect("queued");
    drop(req);
    let r = f.recv();
    assert_eq!(r[0], vec![1]);
    assert_eq!(error_code(&r), "internal");
}

#[test]
fn waits_are_answered_nil_at_their_deadline() {
    let f = fx(16, Arc::new(MonotonicClock::new()));
    let mut t = Vec::new();
    rmp::encode::write_f64(&mut t, 0.05).unwrap();
    let r = f.call(&[&[1], &codec::string("wait_prefetch_status"), &codec::string("r"), &t]);
    assert_eq!(r[2], codec::nil());
    // A session with a result ready is answered at once.
    f.srv.control().sessions.get("s", true).unwrap().lock().set_result(4);
    let r = f.call(&[&[1], &codec::string("wait_prefetch_status"), &codec::string("s"), &t]);
    assert_eq!(r[2], codec::uint(4));
}

#[test]
fn stop_answers_shutting_down_and_workers_end() {
    let f = fx(16, Arc::new(MonotonicClock::new()));
    let srv = f.srv.clone();
    let stopper = std::thread::spawn(move || srv.stop(Duration::from_secs(5)));
    while !f.srv.io_status().stopping {
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = f.call(&[&[1], &codec::string("noop")]);
    assert_eq!(error_code(&r), "shutting_down");
    stopper.join().unwrap();
    assert!(!f.srv.io_status().alive);
    assert!(f.srv.next(0, Duration::from_secs(1)).is_none());
}

#[test]
fn a_stalled_loop_stops_ticking_and_a_panic_ends_it() {
    let clock = ManualClock::new();
    let f = fx(16, clock.clone());
    assert_eq!(f.call(&[&[1], &codec::string("noop")])[2], codec::string("OK"));
    f.srv.inject_fault(Fault::Stall);
    while !f.srv.stalled() {
        std::thread::sleep(Duration::from_millis(1));
    }
    clock.advance_secs(11.0);
    assert!(f.srv.io_status().last_tick_ago_secs.unwrap() >= 11.0);
    f.srv.release_fault();
    assert_eq!(f.call(&[&[1], &codec::string("noop")])[2], codec::string("OK"));
    assert_eq!(f.srv.io_status().last_tick_ago_secs, Some(0.0));
    f.srv.inject_fault(Fault::Panic("boom".into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.srv.io_status().alive && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = f.srv.io_status();
    assert!(!st.alive);
    assert_eq!(st.error.as_deref(), Some("panic: boom"));
}
