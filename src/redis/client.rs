//! What every part of queue_pg sends Redis, on one server or a Redis Cluster alike: groups of
//! commands. A group's keys are all in one slot (a queue's `{queue}` keys, one job's hash), so
//! one node runs it; an atomic group is one MULTI/EXEC. The groups of a call are sorted by node
//! and each node gets its groups in one write: one round trip per node, the nodes answering at
//! the same time. On one server that is one round trip in all.
//!
//! In a cluster, a group that a node redirects is sent again as a whole: after `MOVED` to the
//! master the refreshed slot map names, after `ASK` to the importing node behind `ASKING`,
//! after `TRYAGAIN` or `CLUSTERDOWN` a moment later; all within the call's one deadline. A
//! redirected atomic group ran nothing (its EXEC was refused), and every other group queue_pg
//! sends is idempotent, so sending one again is safe.
//!
//! The redis crate's own cluster connection times each read separately and sleeps between its
//! retries, so queue_pg routes with its own connections (`Conn`, one per node) instead.

use super::conn::Conn;
use super::slots::{self, Redirect, SlotMap};
use super::target::Target;
use crate::settings::RedisMode;
use redis::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where a group goes.
pub enum Route {
    /// The node serving this key's slot.
    Key(String),
    /// This node (`host:port`, from [`Client::masters`]); on one server, the server.
    Node(String),
}

/// Commands that one node runs together.
pub struct Group {
    pub route: Route,
    pub cmds: Vec<redis::Cmd>,
    /// Sent as MULTI/EXEC: all of it runs, or (after a redirect) none of it.
    pub atomic: bool,
}

impl Group {
    /// Commands for the node of `key`'s slot.
    pub fn on_key(key: impl Into<String>) -> Group {
        Group {
            route: Route::Key(key.into()),
            cmds: Vec::new(),
            atomic: false,
        }
    }

    /// A MULTI/EXEC on the node of `key`'s slot.
    pub fn atomic_on_key(key: impl Into<String>) -> Group {
        Group {
            atomic: true,
            ..Group::on_key(key)
        }
    }

    /// Commands for one node (`host:port`).
    pub fn on_node(addr: impl Into<String>) -> Group {
        Group {
            route: Route::Node(addr.into()),
            cmds: Vec::new(),
            atomic: false,
        }
    }

    /// Adds a command and returns it, for its arguments.
    pub fn cmd(&mut self, name: &str) -> &mut redis::Cmd {
        self.cmds.push(redis::cmd(name));
        self.cmds.last_mut().expect("just pushed")
    }

    fn packed(&self, asking: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if asking {
            out.extend(redis::cmd("ASKING").get_packed_command());
        }
        if self.atomic {
            out.extend(redis::cmd("MULTI").get_packed_command());
        }
        for cmd in &self.cmds {
            out.extend(cmd.get_packed_command());
        }
        if self.atomic {
            out.extend(redis::cmd("EXEC").get_packed_command());
        }
        out
    }

    fn replies(&self, asking: bool) -> usize {
        usize::from(asking) + self.cmds.len() + if self.atomic { 2 } else { 0 }
    }
}

/// A group's replies (an atomic group's: EXEC's), or why it failed.
pub type Replies = Result<Vec<Value>, String>;

/// Rounds of redirects a call follows before it gives up.
const MAX_ROUNDS: u32 = 6;

/// Connections to one Redis server, or to the masters of a Redis Cluster.
pub struct Client {
    target: Target,
    /// None on one server.
    map: Option<SlotMap>,
    /// By `host:port`. On one server, its one connection.
    cons: BTreeMap<String, Conn>,
    /// The one server's `host:port`.
    single: Option<String>,
    deadline: Instant,
    interrupted: fn() -> bool,
    /// `CLIENT SETNAME` of each connection (None: unnamed).
    name: Option<String>,
    round_trips: u64,
}

/// Groups sent, replies not read yet.
pub struct Sent {
    groups: Vec<Group>,
    /// Per group, the node to ask after an `ASK`.
    ask: Vec<Option<String>>,
    results: Vec<Option<Replies>>,
    /// Per node written to, its groups in the order sent.
    waiting: Vec<(String, Vec<usize>)>,
}

impl Client {
    /// Connects (one server, or a cluster's seeds until one gives its slot map) before
    /// `deadline`, which then bounds the calls that follow until [`Client::set_deadline`].
    pub fn open(
        target: &Target,
        deadline: Instant,
        interrupted: fn() -> bool,
        name: Option<&str>,
    ) -> Result<Client, String> {
        let mut client = Client {
            target: target.clone(),
            map: None,
            cons: BTreeMap::new(),
            single: None,
            deadline,
            interrupted,
            name: name.map(str::to_owned),
            round_trips: 0,
        };
        match target.mode {
            RedisMode::Standalone => {
                let end = target.endpoint()?;
                let addr = format!("{}:{}", end.host, end.port);
                let con = client.connect(target)?;
                client.cons.insert(addr.clone(), con);
                client.single = Some(addr);
            }
            RedisMode::Cluster => client.refresh()?,
        }
        Ok(client)
    }

    /// The deadline of the calls from now on.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
        self.cons
            .values_mut()
            .for_each(|c| c.set_deadline(deadline));
    }

    pub fn is_cluster(&self) -> bool {
        self.map.is_some()
    }

    /// The masters' `host:port` (on one server, the server's).
    pub fn masters(&self) -> Vec<String> {
        match &self.map {
            Some(map) => map.masters().to_vec(),
            None => self.single.iter().cloned().collect(),
        }
    }

    /// Writes so far: one per node per round.
    pub fn round_trips(&self) -> u64 {
        self.round_trips
    }

    /// Sends the groups, one write per node, without reading the replies.
    pub fn send(&mut self, groups: Vec<Group>) -> Sent {
        let n = groups.len();
        let mut sent = Sent {
            groups,
            ask: vec![None; n],
            results: (0..n).map(|_| None).collect(),
            waiting: Vec::new(),
        };
        self.send_round(&mut sent, (0..n).collect());
        sent
    }

    /// Reads the replies of sent groups, following redirects; one result per group, in order.
    pub fn receive(&mut self, mut sent: Sent) -> Vec<Replies> {
        for round in 1.. {
            let (again, refresh, pause) = self.receive_round(&mut sent);
            if again.is_empty() {
                break;
            }
            let gave_up = if round >= MAX_ROUNDS {
                Some(
                    "Redis Cluster kept redirecting the command; is a slot migration stuck?".into(),
                )
            } else if refresh {
                self.refresh().err()
            } else {
                None
            };
            if let Some(e) = gave_up {
                again
                    .iter()
                    .for_each(|&i| sent.results[i] = Some(Err(e.clone())));
                break;
            }
            if pause {
                let left = self.deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(5 << round)));
            }
            self.send_round(&mut sent, again);
        }
        sent.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("no reply from Redis".into())))
            .collect()
    }

    /// Sends the groups and reads their replies.
    pub fn run(&mut self, groups: Vec<Group>) -> Vec<Replies> {
        let sent = self.send(groups);
        self.receive(sent)
    }

    /// Like [`Client::run`], failing as a whole if any group failed.
    pub fn run_all(&mut self, groups: Vec<Group>) -> Result<Vec<Vec<Value>>, String> {
        self.run(groups).into_iter().collect()
    }

    /// One command on the node of `key`.
    pub fn query<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: redis::Cmd,
    ) -> Result<T, String> {
        self.one(Route::Key(key.into()), cmd)
    }

    /// One command on one node.
    pub fn query_node<T: redis::FromRedisValue>(
        &mut self,
        addr: &str,
        cmd: redis::Cmd,
    ) -> Result<T, String> {
        self.one(Route::Node(addr.into()), cmd)
    }

    fn one<T: redis::FromRedisValue>(
        &mut self,
        route: Route,
        cmd: redis::Cmd,
    ) -> Result<T, String> {
        let group = Group {
            route,
            cmds: vec![cmd],
            atomic: false,
        };
        let mut replies = self.run_all(vec![group])?;
        let reply = replies.pop().and_then(|mut r| r.pop()).ok_or("no reply")?;
        redis::from_redis_value(reply).map_err(|e| e.to_string())
    }

    fn send_round(&mut self, sent: &mut Sent, groups: Vec<usize>) {
        let mut by_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in groups {
            let addr = match &sent.ask[i] {
                Some(addr) => Ok(addr.clone()),
                None => self.node_of(&sent.groups[i].route),
            };
            match addr {
                Ok(addr) => by_node.entry(addr).or_default().push(i),
                Err(e) => sent.results[i] = Some(Err(e)),
            }
        }
        for (addr, members) in by_node {
            let bytes: Vec<u8> = members
                .iter()
                .flat_map(|&i| sent.groups[i].packed(sent.ask[i].is_some()))
                .collect();
            let written = self
                .con(&addr)
                .and_then(|con| con.send_packed_command(&bytes).map_err(|e| e.to_string()));
            self.round_trips += 1;
            match written {
                Ok(()) => sent.waiting.push((addr, members)),
                Err(e) => {
                    self.cons.remove(&addr);
                    let e = self.target.scrub(&format!("Redis at {addr}: {e}"));
                    members
                        .iter()
                        .for_each(|&i| sent.results[i] = Some(Err(e.clone())));
                }
            }
        }
    }

    /// Reads what was sent in the last round. Returns the groups to send again, whether the
    /// slot map is stale, and whether to pause before sending them.
    fn receive_round(&mut self, sent: &mut Sent) -> (Vec<usize>, bool, bool) {
        let (mut again, mut refresh, mut pause) = (Vec::new(), false, false);
        for (addr, members) in std::mem::take(&mut sent.waiting) {
            let Some(con) = self.cons.get_mut(&addr) else {
                continue;
            };
            let mut broken: Option<String> = None;
            for &i in &members {
                if let Some(e) = &broken {
                    sent.results[i] = Some(Err(e.clone()));
                    continue;
                }
                let asking = sent.ask[i].is_some();
                let group = &sent.groups[i];
                let mut replies = Vec::with_capacity(group.replies(asking));
                for _ in 0..group.replies(asking) {
                    match con.recv_response() {
                        Ok(v) => replies.push(v),
                        Err(e) => {
                            broken = Some(self.target.scrub(&format!("Redis at {addr}: {e}")));
                            break;
                        }
                    }
                }
                if let Some(e) = &broken {
                    sent.results[i] = Some(Err(e.clone()));
                    continue;
                }
                match outcome(group, asking, replies) {
                    Outcome::Done(values) => sent.results[i] = Some(Ok(values)),
                    Outcome::Failed(e) => sent.results[i] = Some(Err(e)),
                    Outcome::Redirected(_) if self.map.is_none() => {
                        sent.results[i] = Some(Err(
                            "Redis answered with a cluster redirect: it is a Redis Cluster; \
                             set queue.redis_mode = 'cluster'"
                                .into(),
                        ))
                    }
                    Outcome::Redirected(Redirect::Moved(_)) => {
                        sent.ask[i] = None;
                        refresh = true;
                        again.push(i);
                    }
                    Outcome::Redirected(Redirect::Ask(to)) => {
                        sent.ask[i] = Some(to);
                        again.push(i);
                    }
                    Outcome::Redirected(Redirect::TryAgain) => {
                        sent.ask[i] = None;
                        refresh = true;
                        pause = true;
                        again.push(i);
                    }
                }
            }
            if broken.is_some() {
                self.cons.remove(&addr);
            }
        }
        (again, refresh, pause)
    }

    /// The node a route leads to.
    fn node_of(&self, route: &Route) -> Result<String, String> {
        match (&self.map, route) {
            (None, _) => self.single.clone().ok_or_else(|| "not connected".into()),
            (Some(_), Route::Node(addr)) => Ok(addr.clone()),
            (Some(map), Route::Key(key)) => {
                let slot = slots::slot(key.as_bytes());
                map.master_of(slot)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("no Redis Cluster master serves slot {slot} (of {key})"))
            }
        }
    }

    /// The connection to `addr`, opened if there is none (cluster nodes only).
    fn con(&mut self, addr: &str) -> Result<&mut Conn, String> {
        if !self.cons.contains_key(addr) {
            if self.map.is_none() {
                return Err("the Redis connection broke earlier in this call".into());
            }
            let (host, port) = split_addr(addr)?;
            let target = self.target.at(host, port);
            let con = self.connect(&target)?;
            self.cons.insert(addr.to_owned(), con);
        }
        Ok(self.cons.get_mut(addr).expect("inserted above"))
    }

    fn connect(&self, target: &Target) -> Result<Conn, String> {
        let mut con = Conn::open(target, self.deadline, self.interrupted)?;
        if let Some(name) = &self.name {
            name_connection(&mut con, name)?;
        }
        Ok(con)
    }

    /// Reads the slot map from a node this client is connected to, or else from the seeds.
    fn refresh(&mut self) -> Result<(), String> {
        let mut last_error = String::from("queue.redis_url names no seed");
        let known: Vec<String> = self.cons.keys().cloned().collect();
        for addr in known {
            match self.map_from(&addr) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
        }
        for seed in self.target.seeds() {
            let opened = seed.endpoint().and_then(|end| {
                let con = self.connect(&seed)?;
                let addr = format!("{}:{}", end.host, end.port);
                self.cons.insert(addr.clone(), con);
                Ok(addr)
            });
            match opened.and_then(|addr| self.map_from(&addr)) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
        }
        Err(self.target.scrub(&last_error))
    }

    /// Takes the slot map from the node at `addr`; a node that cannot give it is dropped.
    fn map_from(&mut self, addr: &str) -> Result<(), String> {
        match self.slots_from(addr) {
            Ok(map) => {
                self.map = Some(map);
                Ok(())
            }
            Err(e) => {
                self.cons.remove(addr);
                Err(e)
            }
        }
    }

    fn slots_from(&mut self, addr: &str) -> Result<SlotMap, String> {
        let con = self.cons.get_mut(addr).ok_or("not connected")?;
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(con)
            .map_err(|e| format!("CLUSTER SLOTS at {addr}: {e}"))?;
        let (host, _) = split_addr(addr)?;
        SlotMap::parse(&reply, host)
    }
}

fn split_addr(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("not host:port: {addr}"))?;
    let port = port.parse().map_err(|_| format!("not host:port: {addr}"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

enum Outcome {
    Done(Vec<Value>),
    Redirected(Redirect),
    Failed(String),
}

/// What a group's replies mean: an atomic group's are MULTI's OK, a QUEUED per command, and
/// EXEC's array (or its refusal, when a command was refused as it was queued).
fn outcome(group: &Group, asking: bool, mut replies: Vec<Value>) -> Outcome {
    if asking {
        replies.remove(0);
    }
    let redirect_among = |values: &[Value]| {
        values.iter().find_map(|v| match v {
            Value::ServerError(e) => slots::redirect(e.code(), e.details()),
            _ => None,
        })
    };
    let first_error = |values: &[Value]| {
        values.iter().find_map(|v| match v {
            Value::ServerError(e) => Some(match e.details() {
                Some(d) => format!("{} {d}", e.code()),
                None => e.code().to_owned(),
            }),
            _ => None,
        })
    };
    let values = if group.atomic {
        match replies.pop() {
            Some(Value::Array(values)) => values,
            _ => {
                return match redirect_among(&replies) {
                    Some(r) => Outcome::Redirected(r),
                    None => Outcome::Failed(format!(
                        "MULTI/EXEC refused: {}",
                        first_error(&replies).unwrap_or_else(|| "EXEC aborted".into())
                    )),
                };
            }
        }
    } else {
        if let Some(r) = redirect_among(&replies) {
            return Outcome::Redirected(r);
        }
        replies
    };
    match first_error(&values) {
        Some(e) => Outcome::Failed(e),
        None => Outcome::Done(values),
    }
}

/// Names the connection after its worker ("queue_pg-bridge"), so that `CLIENT LIST` shows whose
/// it is. A refusal (an ACL user without `CLIENT`) leaves it unnamed; only a broken connection is
/// an error.
fn name_connection(con: &mut Conn, label: &str) -> Result<(), String> {
    match redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(label.replace(' ', "-"))
        .query::<()>(con)
    {
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Err(e.to_string())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Value {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap()
    }

    #[test]
    fn an_atomic_group_refused_for_a_redirect_is_sent_again() {
        let mut g = Group::atomic_on_key("k");
        g.cmd("LPUSH").arg("k").arg(1);
        g.cmd("INCRBY").arg("k:n").arg(1);
        assert_eq!(g.replies(false), 4);
        let refused = vec![
            Value::Okay,
            err("MOVED 12 127.0.0.1:7001"),
            err("MOVED 12 127.0.0.1:7001"),
            err("EXECABORT Transaction discarded because of previous errors."),
        ];
        assert!(matches!(
            outcome(&g, false, refused),
            Outcome::Redirected(Redirect::Moved(a)) if a == "127.0.0.1:7001"
        ));
        let ran = vec![
            Value::Okay,
            Value::SimpleString("QUEUED".into()),
            Value::SimpleString("QUEUED".into()),
            Value::Array(vec![Value::Int(1), Value::Int(7)]),
        ];
        assert!(matches!(outcome(&g, false, ran), Outcome::Done(v) if v.len() == 2));
    }

    #[test]
    fn plain_groups_fail_on_any_error_reply() {
        let mut g = Group::on_key("k");
        g.cmd("GET").arg("k");
        g.cmd("LLEN").arg("k");
        assert_eq!(g.replies(true), 3);
        let asked = vec![Value::Okay, Value::Nil, err("ASK 5 h:2")];
        assert!(matches!(
            outcome(&g, true, asked),
            Outcome::Redirected(Redirect::Ask(a)) if a == "h:2"
        ));
        let wrong = vec![Value::Nil, err("WRONGTYPE Operation against a key")];
        assert!(
            matches!(outcome(&g, false, wrong), Outcome::Failed(e) if e.starts_with("WRONGTYPE"))
        );
    }

    #[test]
    fn addresses_split_at_the_last_colon() {
        assert_eq!(split_addr("127.0.0.1:7000").unwrap(), ("127.0.0.1", 7000));
        assert_eq!(split_addr("[::1]:7000").unwrap(), ("::1", 7000));
        assert!(split_addr("nowhere").is_err());
    }
}
