//! One bounded look at Redis for monitoring: per node PING, memory, clients and role, per queue
//! its list lengths and report stream, one round trip per node, all within
//! `queue.redis_timeout` in total. Failures are reported in `error`, never as ERRORs and never
//! as made-up numbers.

use crate::lifecycle::Priority;
use crate::redis::{connect_for_call, info_field, Client, Group, Keys, Target};
use crate::settings;
use redis::Value;

#[derive(Default)]
pub struct RedisProbe {
    /// `PONG` when every master answered.
    pub ping: Option<String>,
    /// Summed over the masters.
    pub memory_used: Option<i64>,
    pub max_memory: Option<i64>,
    pub connected_clients: Option<i64>,
    /// Masters whose `maxmemory-policy` is not `noeviction`, with the policy: they may evict
    /// queue_pg's keys.
    pub evicting: Vec<(String, String)>,
    /// Per queue: LLEN of its high, normal and low lists.
    pub lists: Vec<[i64; 3]>,
    /// Per queue: its report stream.
    pub reports: Vec<ReportStream>,
    /// Every node: one server's one, or a cluster's masters and replicas.
    pub nodes: Vec<NodeProbe>,
    pub error: Option<String>,
}

/// What one Redis node said.
#[derive(Default)]
pub struct NodeProbe {
    pub addr: String,
    /// `master` or `replica`, as the node says (or as the cluster says, if it did not answer).
    pub role: String,
    pub memory_used: Option<i64>,
    pub max_memory: Option<i64>,
    pub maxmemory_policy: Option<String>,
    pub connected_clients: Option<i64>,
    pub error: Option<String>,
}

/// What waits in a queue's report stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportStream {
    pub waiting: i64,
    /// How long the oldest waiting report has been there, by Redis's clock (None: none waits).
    pub oldest_age_ms: Option<i64>,
}

/// Asks every node (PING, INFO memory, clients and replication, TIME) and, per queue, the
/// lengths of its three lists and its report stream (length and oldest entry), one round trip
/// per node, bounded by `queue.redis_timeout` in total (connecting included). A reply of an
/// unexpected kind is an error, never a number.
pub fn probe(queues: &[String]) -> RedisProbe {
    let target = Target::from_settings();
    match ask(&target, queues) {
        Ok(probe) => probe,
        Err(e) => RedisProbe {
            error: Some(target.scrub(&e)),
            ..Default::default()
        },
    }
}

fn ask(target: &Target, queues: &[String]) -> Result<RedisProbe, String> {
    let mut client = connect_for_call(target)?;
    let keys = Keys::new(settings::redis_prefix());
    let nodes = nodes(&mut client)?;
    let mut groups: Vec<Group> = nodes
        .iter()
        .map(|(addr, _)| {
            let mut g = Group::on_node(addr.clone());
            g.cmd("PING");
            g.cmd("INFO").arg("memory");
            g.cmd("INFO").arg("clients");
            g.cmd("INFO").arg("replication");
            g.cmd("TIME");
            g
        })
        .collect();
    for q in queues {
        let mut g = Group::on_key(keys.reports(q));
        for p in Priority::ALL {
            g.cmd("LLEN").arg(keys.list(q, p));
        }
        g.cmd("XLEN").arg(keys.reports(q));
        g.cmd("XRANGE")
            .arg(keys.reports(q))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        groups.push(g);
    }
    let mut replies = client.run(groups).into_iter();
    let mut probe = RedisProbe::default();
    let mut now_ms = None;
    let mut all_masters_ok = true;
    let (mut used, mut max, mut clients) = (0, 0, 0);
    let cluster = client.is_cluster();
    for (addr, role) in nodes {
        // The masters' figures add up (the cluster's view of who is one: a node that does not
        // answer cannot say); one server counts whatever it says it is.
        let counts = !cluster || role == "master";
        let reply = replies.next().unwrap_or_else(|| Err("no reply".into()));
        let node = node_probe(addr, role, reply, &mut now_ms);
        if counts {
            if let Some(policy) = node
                .maxmemory_policy
                .as_ref()
                .filter(|p| *p != "noeviction")
            {
                probe.evicting.push((node.addr.clone(), policy.clone()));
            }
            match (
                &node.error,
                node.memory_used,
                node.max_memory,
                node.connected_clients,
            ) {
                (None, Some(u), Some(m), Some(c)) => {
                    used += u;
                    max += m;
                    clients += c;
                }
                _ => {
                    all_masters_ok = false;
                    probe.error.get_or_insert(format!(
                        "Redis node {}: {}",
                        node.addr,
                        node.error.clone().unwrap_or_default()
                    ));
                }
            }
        }
        probe.nodes.push(node);
    }
    if all_masters_ok {
        probe.ping = Some("PONG".into());
        probe.memory_used = Some(used);
        probe.max_memory = Some(max);
        probe.connected_clients = Some(clients);
    }
    // A queue that could not be asked leaves every queue's figures unknown (null), and the
    // nodes' as they are.
    if let Err(e) = queue_figures(&mut probe, queues, replies, now_ms) {
        probe.lists.clear();
        probe.reports.clear();
        probe.error.get_or_insert(e);
    }
    Ok(probe)
}

fn queue_figures(
    probe: &mut RedisProbe,
    queues: &[String],
    replies: impl Iterator<Item = Result<Vec<Value>, String>>,
    now_ms: Option<i64>,
) -> Result<(), String> {
    let now_ms = now_ms.ok_or("no Redis node answered TIME")?;
    for (q, reply) in queues.iter().zip(replies) {
        let values = reply.map_err(|e| format!("queue {q}: {e}"))?;
        let [high, normal, low, len, first] = values.as_slice() else {
            return Err(format!("Redis gave {} replies for queue {q}", values.len()));
        };
        let mut lengths = [0; 3];
        for (slot, v) in lengths.iter_mut().zip([high, normal, low]) {
            *slot = match v {
                Value::Int(n) => *n,
                other => return Err(format!("LLEN of a queue list answered {other:?}")),
            };
        }
        probe.lists.push(lengths);
        probe.reports.push(report_stream(len, first, now_ms)?);
    }
    if probe.lists.len() != queues.len() {
        return Err("Redis answered fewer queues than asked".into());
    }
    Ok(())
}

/// The nodes to ask, with their role as the cluster sees them: one server's one, or every node
/// `CLUSTER NODES` names (replicas too).
fn nodes(client: &mut Client) -> Result<Vec<(String, String)>, String> {
    let masters = client.masters();
    if !client.is_cluster() {
        return Ok(masters.into_iter().map(|a| (a, "master".into())).collect());
    }
    let first = masters.first().ok_or("the cluster has no master")?;
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("NODES");
    let text: String = client.query_node(first, cmd)?;
    Ok(cluster_nodes(&text))
}

/// `CLUSTER NODES` lines: `<id> <host:port@bus[,hostname]> <flags> …`; nodes without an address
/// (`noaddr`, or a handshake in progress) are left out.
fn cluster_nodes(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, addr, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let addr = addr.split(['@', ',']).next()?;
            if addr.starts_with(':') || flags.contains("noaddr") || flags.contains("handshake") {
                return None;
            }
            let role = if flags.split(',').any(|f| f == "master") {
                "master"
            } else {
                "replica"
            };
            Some((addr.to_owned(), role.to_owned()))
        })
        .collect()
}

fn node_probe(
    addr: String,
    role: String,
    reply: Result<Vec<Value>, String>,
    now_ms: &mut Option<i64>,
) -> NodeProbe {
    let mut node = NodeProbe {
        addr,
        role,
        ..NodeProbe::default()
    };
    let read = |values: Vec<Value>, node: &mut NodeProbe, now_ms: &mut Option<i64>| {
        let [_ping, memory, clients, replication, time] = values.as_slice() else {
            return Err(format!("{} replies to the node probe", values.len()));
        };
        let field = |info: &str, name: &str| {
            info_field(info, name).ok_or_else(|| format!("Redis's INFO has no {name}"))
        };
        let memory = text(memory)?;
        node.memory_used = Some(field(&memory, "used_memory")?);
        node.max_memory = Some(field(&memory, "maxmemory")?);
        node.maxmemory_policy = Some(
            memory
                .lines()
                .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                .map(|p| p.trim().to_owned())
                .ok_or("Redis's INFO has no maxmemory_policy")?,
        );
        node.connected_clients = Some(field(&text(clients)?, "connected_clients")?);
        let role = text(replication)?;
        if role.lines().any(|l| l.trim() == "role:slave") {
            node.role = "replica".into();
        } else if role.lines().any(|l| l.trim() == "role:master") {
            node.role = "master".into();
        }
        now_ms.get_or_insert(redis_time_ms(time)?);
        Ok(())
    };
    if let Err(e) = reply.and_then(|values| read(values, &mut node, now_ms)) {
        node.error = Some(e);
    }
    node
}

/// TIME's reply in milliseconds.
fn redis_time_ms(v: &redis::Value) -> Result<i64, String> {
    let parts: Vec<i64> = match v {
        redis::Value::Array(items) => items
            .iter()
            .map(|i| text(i).and_then(|t| t.parse().map_err(|e| format!("TIME: {e}"))))
            .collect::<Result<_, _>>()?,
        other => return Err(format!("TIME answered {other:?}")),
    };
    match parts.as_slice() {
        [s, us] => Ok(s * 1000 + us / 1000),
        _ => Err("TIME answered other than seconds and microseconds".into()),
    }
}

/// XLEN and the first entry (XRANGE - + COUNT 1) of a report stream.
fn report_stream(
    len: &redis::Value,
    first: &redis::Value,
    now_ms: i64,
) -> Result<ReportStream, String> {
    let waiting = match len {
        redis::Value::Int(n) => *n,
        other => return Err(format!("XLEN of a report stream answered {other:?}")),
    };
    let oldest_ms = match first {
        redis::Value::Array(entries) => match entries.first() {
            None => None,
            Some(redis::Value::Array(entry)) => {
                let id = entry.first().ok_or("XRANGE answered an empty entry")?;
                let id = text(id)?;
                Some(crate::redis::report::entry_ms(&id).ok_or("a report id without a time")?)
            }
            Some(other) => return Err(format!("XRANGE answered {other:?}")),
        },
        other => return Err(format!("XRANGE answered {other:?}")),
    };
    Ok(ReportStream {
        waiting,
        oldest_age_ms: oldest_ms.map(|ms| (now_ms - ms as i64).max(0)),
    })
}

fn text(v: &redis::Value) -> Result<String, String> {
    match v {
        redis::Value::SimpleString(s) => Ok(s.clone()),
        redis::Value::Okay => Ok("OK".into()),
        redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        redis::Value::VerbatimString { text, .. } => Ok(text.clone()),
        other => Err(format!("unexpected reply from Redis: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::cluster_nodes;

    #[test]
    fn cluster_nodes_lines_give_addresses_and_roles() {
        let text = "\
07c3 127.0.0.1:30004@31004,node-4 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
6ec2 :0@0 master,fail,noaddr - 1426238318243 1426238316232 3 disconnected
";
        assert_eq!(
            cluster_nodes(text),
            vec![
                ("127.0.0.1:30004".to_string(), "replica".to_string()),
                ("127.0.0.1:30002".into(), "master".into()),
                ("127.0.0.1:30001".into(), "master".into()),
            ]
        );
    }
}
