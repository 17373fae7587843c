//! A fault-injecting UDP relay: it stands between a QUIC client and a
//! daemon on loopback and drops, delays, reorders, duplicates or
//! blackholes datagrams, as a lossy or partitioned network would.
//!
//! The kernel of the test machines has no `sch_netem`, so `tc netem` is
//! not available; a relay inside the test process needs no package and no
//! privilege, and the test can change the faults at any moment.
//!
//! Topology: clients send to [`Relay::addr`]. Each client address gets its
//! own socket toward the target, as behind a NAT, so the target's answers
//! come back through the relay to the right client. Only the client opens
//! connections: a deftfs daemon never connects back to a client (WATCH and
//! CHANGED ride on a connection the mount opened), so one relay in front of
//! the serving daemon sees every datagram of a pair of nodes.
//!
//! Every datagram waits in one queue until its delivery time (`delay` plus
//! a uniform `jitter`, so datagrams overtake each other) and is sent by one
//! delivery thread. A partition drops datagrams as they arrive and as they
//! leave, so nothing crosses it, not even what was queued before it began.
//!
//! Decisions come from one xorshift generator. Its seed is printed at start;
//! `DEFTFS_RELAY_SEED=N` replays the same sequence of decisions (thread
//! scheduling still decides which datagram meets which decision).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Socket buffers: a QUIC sender bursts a whole congestion window at once,
/// and drops by the kernel would add loss nobody asked for (the kernel caps
/// this at net.core.rmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// The faults applied to datagrams from now on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Probability that a datagram from a client to the target is dropped.
    pub drop_to_target: f64,
    /// Probability that a datagram from the target to a client is dropped.
    pub drop_to_client: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..jitter`.
    pub jitter: Duration,
    /// Probability that a datagram is delivered twice (each copy with its
    /// own delay).
    pub duplicate: f64,
}

/// A lossy link: `loss` each way, `delay` plus up to `jitter`.
pub fn lossy(loss: f64, delay_ms: u64, jitter_ms: u64) -> Faults {
    Faults {
        drop_to_target: loss,
        drop_to_client: loss,
        delay: Duration::from_millis(delay_ms),
        jitter: Duration::from_millis(jitter_ms),
        duplicate: 0.0,
    }
}

/// What crossed the relay in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Datagrams and bytes delivered (duplicates counted).
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams dropped by `drop_*` or by a partition.
    pub dropped: u64,
    pub duplicated: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub to_target: DirStats,
    pub to_client: DirStats,
}

#[derive(Default)]
struct DirCounters {
    datagrams: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
}

impl DirCounters {
    fn get(&self) -> DirStats {
        DirStats {
            datagrams: self.datagrams.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            dropped: self.dropped.load(Ordering::SeqCst),
            duplicated: self.duplicated.load(Ordering::SeqCst),
        }
    }
}

/// A direction through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToTarget,
    ToClient,
}

/// Where a queued datagram goes.
enum Out {
    /// Through the client's own socket toward the target (connected).
    Target(Arc<UdpSocket>),
    /// Through the front socket to this client.
    Client(SocketAddr),
}

struct Pending {
    at: Instant,
    seq: u64,
    out: Out,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Shared {
    target: SocketAddr,
    front: UdpSocket,
    faults: Mutex<Faults>,
    partitioned: AtomicBool,
    /// Partition once this many bytes have been delivered this way.
    cut_after: Mutex<Option<(Dir, u64)>>,
    stop: AtomicBool,
    rng: Mutex<u64>,
    seq: AtomicU64,
    queue: Mutex<BinaryHeap<Reverse<Pending>>>,
    wake: Condvar,
    to_target: DirCounters,
    to_client: DirCounters,
    /// Threads reading the per-client sockets, joined on drop.
    back_threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn counters(&self, dir: Dir) -> &DirCounters {
        match dir {
            Dir::ToTarget => &self.to_target,
            Dir::ToClient => &self.to_client,
        }
    }

    /// Uniform in [0, 1).
    fn random(&self) -> f64 {
        (super::xorshift(&mut lock(&self.rng)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Apply the faults to one datagram that just arrived, and queue what
    /// survives.
    fn admit(&self, dir: Dir, data: &[u8], out: impl Fn() -> Out) {
        let faults = *lock(&self.faults);
        let counters = self.counters(dir);
        let loss = match dir {
            Dir::ToTarget => faults.drop_to_target,
            Dir::ToClient => faults.drop_to_client,
        };
        if self.partitioned.load(Ordering::SeqCst) || self.random() < loss {
            counters.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let copies = if self.random() < faults.duplicate {
            counters.duplicated.fetch_add(1, Ordering::SeqCst);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = faults.jitter.mul_f64(self.random());
            let pending = Pending {
                at: Instant::now() + faults.delay + jitter,
                seq: self.seq.fetch_add(1, Ordering::SeqCst),
                out: out(),
                data: data.to_vec(),
            };
            lock(&self.queue).push(Reverse(pending));
        }
        self.wake.notify_one();
    }

    /// Send what is due, until stopped.
    fn deliver(&self) {
        let mut queue = lock(&self.queue);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait = match queue.peek() {
                Some(Reverse(p)) if p.at <= now => Duration::ZERO,
                Some(Reverse(p)) => (p.at - now).min(POLL),
                None => POLL,
            };
            if !wait.is_zero() {
                queue = self.wake.wait_timeout(queue, wait).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            }
            let Some(Reverse(p)) = queue.pop() else { continue };
            drop(queue);
            let dir = match p.out {
                Out::Target(_) => Dir::ToTarget,
                Out::Client(_) => Dir::ToClient,
            };
            let counters = self.counters(dir);
            if self.partitioned.load(Ordering::SeqCst) {
                counters.dropped.fetch_add(1, Ordering::SeqCst);
            } else {
                let sent = match &p.out {
                    Out::Target(socket) => socket.send(&p.data),
                    Out::Client(addr) => self.front.send_to(&p.data, addr),
                };
                // A full socket buffer or a closed port is loss, as on a network.
                if sent.is_ok() {
                    counters.datagrams.fetch_add(1, Ordering::SeqCst);
                    let bytes = counters.bytes.fetch_add(p.data.len() as u64, Ordering::SeqCst) + p.data.len() as u64;
                    let mut cut = lock(&self.cut_after);
                    if cut.is_some_and(|(d, n)| d == dir && bytes >= n) {
                        self.partitioned.store(true, Ordering::SeqCst);
                        *cut = None;
                    }
                }
            }
            queue = lock(&self.queue);
        }
    }
}

fn bind(addr: SocketAddr) -> UdpSocket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).expect("udp socket");
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).expect("bind the relay socket");
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(POLL)).expect("read timeout");
    socket
}

/// A running relay in front of `target`; its threads stop on drop.
pub struct Relay {
    addr: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relay datagrams sent to [`Relay::addr`] to `target`, without faults
    /// until [`Relay::set`].
    pub fn start(target: SocketAddr) -> Relay {
        let seed = match std::env::var("DEFTFS_RELAY_SEED") {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("DEFTFS_RELAY_SEED={s:?} is not a number")),
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        };
        // xorshift must not start at 0.
        let seed = seed.max(1);
        let front = bind(SocketAddr::from(([127, 0, 0, 1], 0)));
        let addr = front.local_addr().expect("relay address");
        eprintln!("relay {addr} -> {target}: seed {seed} (replay with DEFTFS_RELAY_SEED={seed})");
        let shared = Arc::new(Shared {
            target,
            front,
            faults: Mutex::new(Faults::default()),
            partitioned: AtomicBool::new(false),
            cut_after: Mutex::new(None),
            stop: AtomicBool::new(false),
            rng: Mutex::new(seed),
            seq: AtomicU64::new(0),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            to_target: DirCounters::default(),
            to_client: DirCounters::default(),
            back_threads: Mutex::new(Vec::new()),
        });
        let deliver = {
            let shared = shared.clone();
            std::thread::Builder::new().name("relay-deliver".into()).spawn(move || shared.deliver()).expect("spawn")
        };
        let front = {
            let shared = shared.clone();
            std::thread::Builder::new().name("relay-front".into()).spawn(move || front_loop(&shared)).expect("spawn")
        };
        Relay { addr, seed, shared, threads: vec![front, deliver] }
    }

    /// Where clients send: configure this as the partner's endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Apply `faults` to every datagram from now on.
    pub fn set(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Drop everything, both ways (`true`), or stop doing so (`false`).
    pub fn partition(&self, on: bool) {
        self.shared.partitioned.store(on, Ordering::SeqCst);
    }

    /// Partition the link (as [`Relay::partition`]) as soon as `bytes`
    /// have been delivered in direction `dir` since the relay started: the
    /// cut lands where the test wants it, however fast the transfer runs.
    pub fn partition_after(&self, dir: Dir, bytes: u64) {
        *lock(&self.shared.cut_after) = Some((dir, bytes));
    }

    pub fn is_partitioned(&self) -> bool {
        self.shared.partitioned.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> Stats {
        Stats { to_target: self.shared.to_target.get(), to_client: self.shared.to_client.get() }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The front thread has stopped: no new back thread can appear.
        let backs = std::mem::take(&mut *lock(&self.shared.back_threads));
        for t in backs {
            let _ = t.join();
        }
    }
}

/// Read from clients; give each new client its own socket toward the target.
fn front_loop(shared: &Arc<Shared>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, from) = match shared.front.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue,
        };
        let back = clients.entry(from).or_insert_with(|| {
            let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0)));
            socket.connect(shared.target).expect("connect toward the target");
            let socket = Arc::new(socket);
            let (shared2, socket2) = (shared.clone(), socket.clone());
            let handle =
                std::thread::Builder::new().name("relay-back".into()).spawn(move || back_loop(&shared2, &socket2, from)).expect("spawn");
            lock(&shared.back_threads).push(handle);
            socket
        });
        shared.admit(Dir::ToTarget, &buf[..n], || Out::Target(back.clone()));
    }
}

/// Read the target's answers to one client.
fn back_loop(shared: &Shared, socket: &UdpSocket, client: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::SeqCst) {
        match socket.recv(&mut buf) {
            Ok(n) => shared.admit(Dir::ToClient, &buf[..n], || Out::Client(client)),
            // Timeouts, and ECONNREFUSED while the target is down.
            Err(_) => continue,
        }
    }
}
