//! The admin page: servers with their connections and message rates, online users, recent
//! errors and users' reports of others, refreshed every second; and an operator's deletion of
//! an account (`POST /admin/api/users/ID/delete`, with the token in the `Authorization`
//! header only). Behind the admin token (`--admin-token`), given for the page and its state as
//! `?token=` or `Authorization: Bearer`. Off when no token is configured.

use std::sync::Arc;

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::api::ApiError;
use crate::service::Service;
use crate::store::Report;

#[derive(Serialize)]
struct ServerRow {
    id: String,
    client_addr: String,
    linked: bool,
    connections: u32,
    forwarded: u64,
}

#[derive(Serialize)]
struct ErrorRow {
    at_ms: u64,
    code: String,
    message: String,
}

#[derive(Serialize)]
struct State {
    router: String,
    servers: Vec<ServerRow>,
    /// The first [`ONLINE_SHOWN`] online users, by name.
    online: Vec<String>,
    /// How many users are online.
    online_count: usize,
    errors: Vec<ErrorRow>,
    /// The newest [`REPORTS_SHOWN`] reports users made of others, newest first.
    reports: Vec<Report>,
}

/// Reports the page lists (the store keeps more).
const REPORTS_SHOWN: usize = 100;

/// Online users the page lists by name (it counts them all).
const ONLINE_SHOWN: usize = 1000;

#[derive(serde::Deserialize, Default)]
struct TokenQuery {
    token: Option<String>,
}

fn authorized(service: &Service, query: &TokenQuery, header: Option<&str>) -> bool {
    // An empty token (a library caller's mistake; the binary refuses one) opens nothing.
    let Some(expected) = service
        .config
        .admin_token
        .as_deref()
        .filter(|t| !t.is_empty())
    else {
        return false;
    };
    // An empty `?token=` does not hide the header.
    let given = query
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .or_else(|| header.and_then(crate::api::bearer_token));
    // Compare in constant time: the token is a credential.
    given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

fn denied(service: &Service) -> Response {
    let (status, code, message) = if service.config.admin_token.is_none() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin page is off (no --admin-token)",
        )
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin token required",
        )
    };
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"code": code, "message": message})),
        status,
    )
    .into_response()
}

/// `/admin` (the page), `/admin/api/state` (its data) and `/admin/api/users/ID/delete`.
pub fn routes(
    service: Arc<Service>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let with_service = warp::any().map(move || service.clone());
    let auth = with_service
        .clone()
        .and(warp::query::<TokenQuery>())
        .and(warp::header::optional::<String>("authorization"));
    let page = warp::path!("admin").and(warp::get()).and(auth.clone()).map(
        |service: Arc<Service>, q: TokenQuery, h: Option<String>| {
            if !authorized(&service, &q, h.as_deref()) {
                return denied(&service);
            }
            warp::reply::with_header(PAGE, "content-type", "text/html; charset=utf-8")
                .into_response()
        },
    );
    let state = warp::path!("admin" / "api" / "state")
        .and(warp::get())
        .and(auth)
        .then(
            |service: Arc<Service>, q: TokenQuery, h: Option<String>| async move {
                if !authorized(&service, &q, h.as_deref()) {
                    return denied(&service);
                }
                let servers = service
                    .server_overview()
                    .into_iter()
                    .map(|(info, linked, forwarded)| ServerRow {
                        id: info.id,
                        client_addr: info.client_addr.to_string(),
                        linked,
                        connections: info.load,
                        forwarded,
                    })
                    .collect();
                // A scan up to two seconds old will do: every open page asks each second.
                let (online, online_count) =
                    match service.online_scan(std::time::Duration::from_secs(2)).await {
                        Ok(users) => (
                            users
                                .iter()
                                .take(ONLINE_SHOWN)
                                .map(|a| a.name.clone())
                                .collect(),
                            users.len(),
                        ),
                        Err(e) => {
                            service.record_error(e.code(), format!("admin page: {e}"));
                            (Vec::new(), 0)
                        }
                    };
                let errors = service
                    .recent_errors()
                    .into_iter()
                    .rev()
                    .map(|e| ErrorRow {
                        at_ms: e.at_ms,
                        code: e.code,
                        message: e.message,
                    })
                    .collect();
                // Logged, not recorded: each open page asks every second, and an outage would
                // fill the recent errors.
                let reports = service.reports(REPORTS_SHOWN).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "admin page: reports not read");
                    Vec::new()
                });
                let state = State {
                    router: service.config.id.clone(),
                    servers,
                    online,
                    online_count,
                    errors,
                    reports,
                };
                warp::reply::json(&state).into_response()
            },
        );
    // By id, as reports name accounts (a name may be someone else's by now), and with the
    // token in the Authorization header only: a query string ends up in logs and histories.
    let delete_user = warp::path!("admin" / "api" / "users" / u64 / "delete")
        .and(warp::post())
        .and(with_service.clone())
        .and(warp::header::optional::<String>("authorization"))
        .then(
            |id: u64, service: Arc<Service>, h: Option<String>| async move {
                if !authorized(&service, &TokenQuery::default(), h.as_deref()) {
                    return denied(&service);
                }
                let deletion = async move { service.delete_user_as_operator(id).await };
                match crate::api::to_the_end(deletion).await {
                    Ok(name) => warp::reply::json(&serde_json::json!({"id": id, "name": name}))
                        .into_response(),
                    Err(e) => ApiError::from(e).into_response(),
                }
            },
        );
    page.or(state).unify().or(delete_user).unify()
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>cim admin</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
  table { border-collapse: collapse; margin-bottom: 1.5em; }
  th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
  th { background: #f0f0f0; }
  .down { color: #b00; }
  #status { color: #666; font-size: 0.9em; }
</style>
</head>
<body>
<h1>cim admin <span id="router"></span></h1>
<p id="status">loading...</p>
<h2>Servers</h2>
<table id="servers">
  <thead><tr><th>server</th><th>address</th><th>link</th><th>connections</th><th>messages/s</th></tr></thead>
  <tbody></tbody>
</table>
<h2>Online users (<span id="online-count">0</span>)</h2>
<ul id="online"></ul>
<h2>Recent errors</h2>
<table id="errors">
  <thead><tr><th>time</th><th>code</th><th>message</th></tr></thead>
  <tbody></tbody>
</table>
<h2>Reports</h2>
<p>Users' reports of others, newest first. "Delete account" deletes the reported account
for good, after a confirmation (the API: <code>POST /admin/api/users/ID/delete</code> with
<code>Authorization: Bearer</code> and the admin token).</p>
<p id="deletion"></p>
<table id="reports">
  <thead><tr><th>time</th><th>by</th><th>reported</th><th>reason</th><th></th></tr></thead>
  <tbody></tbody>
</table>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
let last = null;
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}
async function refresh() {
  try {
    const res = await fetch("/admin/api/state?token=" + encodeURIComponent(token));
    if (!res.ok) throw new Error("HTTP " + res.status);
    const state = await res.json();
    const now = Date.now();
    document.getElementById("router").textContent = "(" + state.router + ")";
    const servers = document.querySelector("#servers tbody");
    servers.replaceChildren();
    for (const s of state.servers) {
      const row = document.createElement("tr");
      row.className = "server";
      cell(row, s.id, "server-id");
      cell(row, s.client_addr);
      cell(row, s.linked ? "up" : "down", s.linked ? "" : "down");
      cell(row, String(s.connections), "connections");
      let rate = "-";
      if (last && last.forwarded[s.id] !== undefined) {
        const secs = (now - last.at) / 1000;
        rate = ((s.forwarded - last.forwarded[s.id]) / secs).toFixed(1);
      }
      cell(row, rate, "rate");
      servers.appendChild(row);
    }
    last = { at: now, forwarded: Object.fromEntries(state.servers.map(s => [s.id, s.forwarded])) };
    const online = document.getElementById("online");
    online.replaceChildren();
    for (const name of state.online) {
      const li = document.createElement("li");
      li.className = "online-user";
      li.textContent = name;
      online.appendChild(li);
    }
    document.getElementById("online-count").textContent = String(state.online_count);
    const errors = document.querySelector("#errors tbody");
    errors.replaceChildren();
    for (const e of state.errors) {
      const row = document.createElement("tr");
      cell(row, new Date(e.at_ms).toISOString());
      cell(row, e.code, "error-code");
      cell(row, e.message);
      errors.appendChild(row);
    }
    const reports = document.querySelector("#reports tbody");
    reports.replaceChildren();
    for (const r of state.reports) {
      const row = document.createElement("tr");
      cell(row, new Date(r.at_ms).toISOString());
      cell(row, r.reporter + " (" + r.reporter_id + ")", "reporter");
      cell(row, r.reported + " (" + r.reported_id + ")", "reported");
      cell(row, r.reason, "reason");
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.className = "delete-account";
      button.textContent = "Delete account";
      button.onclick = () => deleteAccount(r.reported_id, r.reported);
      td.appendChild(button);
      row.appendChild(td);
      reports.appendChild(row);
    }
    document.getElementById("status").textContent = "updated " + new Date(now).toISOString();
  } catch (err) {
    document.getElementById("status").textContent = "refresh failed: " + err;
  }
}
async function deleteAccount(id, name) {
  if (!confirm("Delete the account " + name + " (" + id + ") for good?")) return;
  const said = document.getElementById("deletion");
  try {
    // The token in the header: the deletion takes it nowhere else.
    const res = await fetch("/admin/api/users/" + id + "/delete", {
      method: "POST",
      headers: { Authorization: "Bearer " + token },
    });
    const body = await res.json();
    said.textContent = res.ok
      ? "deleted " + body.name + " (" + body.id + ")"
      : "not deleted: " + body.code + ": " + body.message;
  } catch (err) {
    said.textContent = "not deleted: " + err;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"##;
