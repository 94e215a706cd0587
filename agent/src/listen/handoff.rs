//! Zero-downtime restart: a running agent hands its listening sockets (every proxy worker's
//! `SO_REUSEPORT` listener and the admin listener) to its successor as file descriptors over
//! a Unix socket (`SCM_RIGHTS`), in the model of Pingora's graceful upgrade and Envoy's hot
//! restart. This module owns both ends of that protocol and decides which socket each
//! worker of the new agent serves.
//!
//! One Unix stream connection to `--handoff-socket` carries it all:
//! 1. the new agent connects; the old one sends one line of JSON ([`Header`]: protocol
//!    version, its pid, its addresses, how many proxy sockets) with the descriptors attached,
//!    proxy sockets first, then the admin socket;
//! 2. the new agent accepts nothing until a routing table is in force (state dir or
//!    controller), then writes `ready\n`;
//! 3. the old agent answers `draining\n`, stops accepting — closing only its own copies of
//!    the descriptors: the sockets, and the connections queued on them, live on in the new
//!    process, so nothing is refused — and drains as on SIGTERM;
//! 4. the new agent then listens on the hand-off path itself, for the next one.
//!
//! A new agent that goes away before step 2 changes nothing: the old one keeps serving and
//! offers its sockets to the next one that connects.
//!
//! The new agent takes *all* proxy sockets, whatever its worker count: with `SO_REUSEPORT`
//! the kernel hashes each new connection to one socket of the group, and a socket that
//! nobody accepts on any more would hold its share of connections until the old process
//! exits, and then reset them. Sockets of another address (the new agent was given another
//! `--listen` or `--admin-addr`) are not used: the new agent binds its own address, and the
//! old one closes the old address when it drains.

use super::bind::{bind_listeners, bind_more};
use crate::control::state::Shared;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

/// Version of the hand-off protocol; an agent speaking another one is refused.
pub(crate) const PROTOCOL_VERSION: u32 = 1;
/// Linux passes at most 253 descriptors in one message (`SCM_MAX_FD`); one is the admin
/// socket.
const MAX_PROXY_SOCKETS: usize = 252;
/// The header line is a few hundred bytes; anything longer is not a weir agent.
const MAX_HEADER: usize = 4096;
/// How long either side waits for the other's answer once the exchange has started (not
/// for readiness, which may take as long as the controller does).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the old agent says about the descriptors it sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    version: u32,
    pid: u32,
    listen: SocketAddr,
    admin: SocketAddr,
    proxy_sockets: usize,
    /// The old agent's network namespace (`/proc/self/ns/net`): sockets bound in another one
    /// (another pod on the pod network) would serve another address, so they are not taken.
    #[serde(default)]
    netns: Option<String>,
}

/// This process's network namespace, as `/proc/self/ns/net` names it.
fn netns() -> Option<String> {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .map(|p| p.display().to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hand-off socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hand-off from the agent listening at {path} failed: {why}")]
    Protocol { path: PathBuf, why: String },
    #[error("cannot listen on --listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on --admin-addr {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The listening sockets this agent serves, inherited or bound.
#[derive(Debug)]
pub struct Sockets {
    /// The proxy listeners of each worker (one, or several inherited ones when the old agent
    /// had more workers than this one).
    pub workers: Vec<Vec<TcpListener>>,
    /// The admin listener (non-blocking, for `tokio::net::TcpListener::from_std`).
    pub admin: TcpListener,
    /// The agent the sockets came from, waiting for this one to be ready.
    pub predecessor: Option<Predecessor>,
}

/// The old agent, on the other end of the hand-off connection.
#[derive(Debug)]
pub struct Predecessor {
    stream: StdUnixStream,
    pid: u32,
    path: PathBuf,
}

/// Takes over the sockets of the agent listening at `handoff` if there is one, and binds
/// whatever it did not provide: `workers` proxy listeners on `listen`, the admin listener on
/// `admin`. Blocking: runs once, before the runtimes start.
pub fn acquire(
    handoff: Option<&Path>,
    listen: SocketAddr,
    admin: SocketAddr,
    workers: usize,
) -> Result<Sockets, Error> {
    let workers = workers.max(1);
    let received = match handoff {
        Some(path) => receive(path)?,
        None => None,
    };
    let (proxy_in, admin_in, predecessor) = match received {
        Some((proxy, admin, pred)) => (proxy, Some(admin), Some(pred)),
        None => (Vec::new(), None, None),
    };

    let mut inherited = Vec::new();
    let mut elsewhere = None;
    for l in proxy_in {
        match l.local_addr() {
            Ok(a) if a == listen => inherited.push(l),
            Ok(a) => elsewhere = Some(a),
            Err(_) => {}
        }
    }
    if let Some(old) = elsewhere {
        tracing::warn!(%old, new = %listen, "the running agent listens on another address: binding --listen anew; the old address closes when the old agent has drained");
    }
    let per_worker = if inherited.is_empty() {
        bind_listeners(listen, workers)
            .map_err(|source| Error::Listen {
                addr: listen,
                source,
            })?
            .into_iter()
            .map(|l| vec![l])
            .collect()
    } else {
        let count = inherited.len();
        if count < workers {
            let more = bind_more(listen, workers - count).map_err(|source| Error::Listen {
                addr: listen,
                source,
            })?;
            inherited.extend(more);
        }
        tracing::info!(
            inherited = count,
            workers,
            "serving the inherited proxy sockets{}",
            if count < workers {
                " and new ones for the extra workers"
            } else {
                ""
            }
        );
        let mut per: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, l) in inherited.into_iter().enumerate() {
            per[i % workers].push(l);
        }
        per
    };

    let admin_listener = match admin_in {
        Some(l) if l.local_addr().ok() == Some(admin) => l,
        other => {
            if let Some(old) = other.and_then(|l| l.local_addr().ok()) {
                tracing::warn!(%old, new = %admin, "the running agent's admin API is on another address: binding --admin-addr anew");
            }
            TcpListener::bind(admin).map_err(|source| Error::Admin {
                addr: admin,
                source,
            })?
        }
    };
    admin_listener
        .set_nonblocking(true)
        .map_err(|source| Error::Admin {
            addr: admin,
            source,
        })?;
    Ok(Sockets {
        workers: per_worker,
        admin: admin_listener,
        predecessor,
    })
}

type Received = (Vec<TcpListener>, TcpListener, Predecessor);

/// Connects to `path` and receives the running agent's sockets; `None` when no agent runs
/// there (no file, or a stale one left by an agent that is gone).
fn receive(path: &Path) -> Result<Option<Received>, Error> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let protocol = |why: String| Error::Protocol {
        path: path.to_path_buf(),
        why,
    };
    let stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(path = %path.display(), "no running agent to take over from; binding the listeners");
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    // An agent that accepts but never sends must not hang this start forever.
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err)?;
    let mut buf = [0u8; MAX_HEADER];
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_PROXY_SOCKETS + 1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| {
        if e == rustix::io::Errno::AGAIN {
            // It serves one successor at a time: another new agent is taking over.
            protocol(format!(
                "the running agent did not send its sockets within {ANSWER_TIMEOUT:?} (is another new agent taking over from it?)"
            ))
        } else {
            io_err(e.into())
        }
    })?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(protocol(
            "more descriptors were sent than a hand-off carries".into(),
        ));
    }
    if msg.bytes == 0 {
        // It closed the connection at once (it is shutting down): nothing to take over.
        tracing::warn!(path = %path.display(), "the agent at the hand-off socket closed the connection without handing over; binding the listeners");
        return Ok(None);
    }
    let mut line = buf[..msg.bytes].to_vec();
    // One line; a stream socket may deliver it in pieces.
    while !line.contains(&b'\n') {
        if line.len() > MAX_HEADER {
            return Err(protocol("the header line is too long".into()));
        }
        let n = (&stream).read(&mut buf).map_err(io_err)?;
        if n == 0 {
            return Err(protocol("the connection closed inside the header".into()));
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let header: Header = serde_json::from_slice(&line[..end])
        .map_err(|e| protocol(format!("unreadable header: {e}")))?;
    if header.version != PROTOCOL_VERSION {
        return Err(protocol(format!(
            "the running agent (pid {}) speaks hand-off version {}, this one {}: stop it before starting this one",
            header.pid, header.version, PROTOCOL_VERSION
        )));
    }
    let own = netns();
    if header.netns.is_some() && own.is_some() && header.netns != own {
        // Dropping the connection tells the old agent to keep serving.
        tracing::warn!(old_pid = header.pid, old_netns = ?header.netns, netns = ?own, "the running agent is in another network namespace (another pod, not on the host network): its sockets are no use here; binding the listeners");
        return Ok(None);
    }
    if fds.len() != header.proxy_sockets + 1 {
        return Err(protocol(format!(
            "the header announces {} proxy sockets and the admin socket, {} descriptors came",
            header.proxy_sockets,
            fds.len()
        )));
    }
    let admin = fds
        .pop()
        .map(TcpListener::from)
        .ok_or_else(|| protocol("no admin socket".into()))?;
    let proxy: Vec<TcpListener> = fds.into_iter().map(TcpListener::from).collect();
    tracing::info!(
        old_pid = header.pid,
        listen = %header.listen,
        admin = %header.admin,
        proxy_sockets = proxy.len(),
        "took over the listening sockets of the running agent; it keeps serving until this one is ready"
    );
    let pred = Predecessor {
        stream,
        pid: header.pid,
        path: path.to_path_buf(),
    };
    Ok(Some((proxy, admin, pred)))
}

impl Predecessor {
    /// The old agent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the old agent that this one is ready, and waits until it has started draining.
    pub async fn confirm_ready(self) -> Result<(), Error> {
        let io_err = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        self.stream.set_read_timeout(None).map_err(io_err)?;
        self.stream.set_nonblocking(true).map_err(io_err)?;
        let mut stream =
            UnixStream::from_std(self.stream.try_clone().map_err(io_err)?).map_err(io_err)?;
        stream.write_all(b"ready\n").await.map_err(io_err)?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, read_line(&mut stream))
            .await
            .map_err(|_| Error::Protocol {
                path: self.path.clone(),
                why: "no answer to `ready`".into(),
            })?
            .map_err(io_err)?;
        if answer != "draining" {
            return Err(Error::Protocol {
                path: self.path.clone(),
                why: format!("answered {answer:?} to `ready`"),
            });
        }
        tracing::info!(
            old_pid = self.pid,
            "ready: the old agent stops accepting and drains; this one serves all connections now"
        );
        Ok(())
    }
}

/// Reads one short line (without its `\n`); an empty string at end of stream.
async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: the lines are a few bytes, once per restart, and nothing may be read
    // past the line.
    while stream.read(&mut byte).await? == 1 {
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= 64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// This agent's sockets, duplicated, as it offers them to a successor.
#[derive(Debug)]
pub struct Offer {
    header: Header,
    fds: Vec<OwnedFd>,
}

impl Offer {
    /// Duplicates the descriptors of `sockets` (before the workers take them).
    pub fn new(sockets: &Sockets, listen: SocketAddr, admin: SocketAddr) -> io::Result<Self> {
        let mut fds = Vec::new();
        for l in sockets.workers.iter().flatten() {
            fds.push(OwnedFd::from(l.try_clone()?));
        }
        let proxy_sockets = fds.len();
        if proxy_sockets > MAX_PROXY_SOCKETS {
            // A successor must take every socket of the group (see the module docs).
            return Err(io::Error::other(format!(
                "{proxy_sockets} proxy sockets do not fit in one hand-off (at most {MAX_PROXY_SOCKETS})"
            )));
        }
        fds.push(OwnedFd::from(sockets.admin.try_clone()?));
        Ok(Self {
            header: Header {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                listen,
                admin,
                proxy_sockets,
                netns: netns(),
            },
            fds,
        })
    }
}

/// Listens on `path` for the next agent: removes a stale socket file first, creates the
/// folder if needed, and makes the socket reachable by this user only (whoever connects
/// gets the listening sockets and can make this agent drain).
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Offers this agent's sockets to every agent that connects to `listener`, one at a time,
/// until one of them is ready; returns its pid. Dropping the future (the agent is shutting
/// down for another reason) closes the listener and the duplicated descriptors, so that a
/// drain really closes the sockets.
pub async fn offer(listener: UnixListener, offer: Offer) -> u32 {
    let uid = rustix::process::getuid().as_raw();
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hand-off accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "refused a hand-off to a process of another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a hand-off: peer credentials unknown");
                continue;
            }
        }
        let peer = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .unwrap_or_default();
        if let Err(e) = send(&stream, &offer).await {
            tracing::warn!(error = %e, new_pid = peer, "could not hand the sockets over; still serving");
            continue;
        }
        tracing::info!(
            new_pid = peer,
            "handed the listening sockets to a new agent; serving until it is ready"
        );
        match read_line(&mut stream).await {
            Ok(line) if line == "ready" => {}
            Ok(line) if line.is_empty() => {
                tracing::warn!(
                    new_pid = peer,
                    "the new agent went away before it was ready; still serving, and offering the sockets to the next one"
                );
                continue;
            }
            Ok(line) => {
                tracing::warn!(new_pid = peer, said = %line, "the new agent said something else than `ready`; still serving");
                continue;
            }
            Err(e) => {
                tracing::warn!(new_pid = peer, error = %e, "the hand-off connection broke before the new agent was ready; still serving");
                continue;
            }
        }
        // Best effort: the new agent logs it if the answer does not come, and serves anyway.
        let answered = tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(b"draining\n")).await;
        if !matches!(answered, Ok(Ok(()))) {
            tracing::warn!(
                new_pid = peer,
                "could not answer the new agent's `ready`; draining anyway"
            );
        }
        return peer as u32;
    }
}

/// Sends the header line with every descriptor attached.
async fn send(stream: &UnixStream, offer: &Offer) -> io::Result<()> {
    let mut line = serde_json::to_vec(&offer.header)?;
    line.push(b'\n');
    let borrowed: Vec<_> = offer.fds.iter().map(|fd| fd.as_fd()).collect();
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_PROXY_SOCKETS + 1))];
    let mut sent = 0;
    while sent < line.len() {
        let n = tokio::time::timeout(
            ANSWER_TIMEOUT,
            stream.async_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                // The descriptors go with the first bytes only.
                if sent == 0 && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                    return Err(io::Error::other("too many descriptors for one message"));
                }
                rustix::net::sendmsg(
                    stream,
                    &[IoSlice::new(&line[sent..])],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            }),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the new agent does not read"))??;
        sent += n;
    }
    Ok(())
}

/// Waits until this agent has a routing table in force (from its state dir or a
/// controller). Polled: it runs once per start, and `Shared` has no broadcast of readiness.
pub async fn wait_ready(shared: &Shared) {
    while !shared.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The default hand-off socket: in the state dir when there is one.
pub fn default_path(state_dir: Option<&Path>) -> Option<PathBuf> {
    state_dir.map(|d| d.join("handoff.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets(workers: usize) -> (Sockets, SocketAddr, SocketAddr) {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let probe = std::net::TcpListener::bind(listen).expect("bind");
        let listen = probe.local_addr().expect("addr");
        drop(probe);
        let admin_probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let admin = admin_probe.local_addr().expect("addr");
        drop(admin_probe);
        let s = acquire(None, listen, admin, workers).expect("bind");
        (s, listen, admin)
    }

    #[tokio::test]
    async fn a_successor_takes_every_socket_and_the_old_one_returns_once_it_is_ready() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        let (old, listen, admin) = sockets(3);
        let offered = Offer::new(&old, listen, admin).expect("dup");
        let server = tokio::spawn(offer(listen_ok(&path), offered));

        // Two workers now: the third inherited socket is served too, by worker 0.
        let p = path.clone();
        let new = tokio::task::spawn_blocking(move || acquire(Some(&p), listen, admin, 2))
            .await
            .expect("join")
            .expect("take over");
        assert_eq!(new.workers.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(new.admin.local_addr().expect("addr"), admin);
        let pred = new.predecessor.expect("predecessor");
        assert_eq!(pred.pid(), std::process::id());
        assert!(!server.is_finished(), "the old one waits for `ready`");
        pred.confirm_ready().await.expect("confirm");
        assert_eq!(server.await.expect("join"), std::process::id());

        // The inherited sockets are the same sockets: a connection is accepted on them.
        let client = std::net::TcpStream::connect(listen).expect("connect");
        drop(client);
    }

    #[tokio::test]
    async fn a_successor_that_goes_away_leaves_the_offer_open_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        let (old, listen, admin) = sockets(1);
        let server = tokio::spawn(offer(
            listen_ok(&path),
            Offer::new(&old, listen, admin).expect("dup"),
        ));
        let p = path.clone();
        let first = tokio::task::spawn_blocking(move || acquire(Some(&p), listen, admin, 1))
            .await
            .expect("join")
            .expect("take over");
        drop(first);
        let p = path.clone();
        let second = tokio::task::spawn_blocking(move || acquire(Some(&p), listen, admin, 1))
            .await
            .expect("join")
            .expect("take over again");
        second
            .predecessor
            .expect("predecessor")
            .confirm_ready()
            .await
            .expect("confirm");
        server.await.expect("join");
    }

    #[test]
    fn a_stale_socket_file_means_no_predecessor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        assert!(receive(&path).expect("no error").is_none());
        assert!(
            receive(&dir.path().join("absent.sock"))
                .expect("no error")
                .is_none()
        );
    }

    #[test]
    fn another_protocol_version_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().expect("accept");
            let _ = s.write_all(b"{\"version\":99,\"pid\":1,\"listen\":\"127.0.0.1:1\",\"admin\":\"127.0.0.1:2\",\"proxy_sockets\":0}\n");
        });
        let err = receive(&path).expect_err("refused");
        assert!(err.to_string().contains("version 99"), "{err}");
        t.join().expect("join");
    }

    #[test]
    fn sockets_of_another_network_namespace_are_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handoff.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().expect("accept");
            let _ = s.write_all(b"{\"version\":1,\"pid\":1,\"listen\":\"127.0.0.1:1\",\"admin\":\"127.0.0.1:2\",\"proxy_sockets\":0,\"netns\":\"net:[1]\"}\n");
            // The new agent hangs up instead of saying `ready`.
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut rest);
            rest
        });
        assert!(receive(&path).expect("no error").is_none());
        assert!(
            t.join().expect("join").is_empty(),
            "nothing said to the old agent"
        );
    }

    fn listen_ok(path: &Path) -> UnixListener {
        listen(path).expect("listen")
    }
}
