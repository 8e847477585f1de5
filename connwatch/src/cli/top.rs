//! `connwatch top`: a live view that refreshes every second: connections by state, a
//! histogram of their ages, destroys per minute by reason, and the oldest and most idle
//! connections. Made for an 80x24 terminal and up; `q` (or Esc, or Ctrl-C) quits.
//!
//! With a daemon it asks the daemon (three requests a second: status and two short
//! lists); without one each refresh reads the kernel's socket table and the pinned map.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row as TableRow, Table};
use ratatui::Frame;
use serde_json::json;

use super::list::{show_age, show_bytes};
use crate::clock::human;
use crate::control::client::Client;
use crate::control::protocol::{list_request, Status};
use crate::observe::view::{
    age_histogram, bucket_label, read_local, Filter, Item, Query, Row, SortKey,
};

const REFRESH: Duration = Duration::from_secs(1);
/// Rows asked for in each of the two connection tables.
const SHOWN: usize = 20;

/// What one refresh shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// Where the numbers come from: the daemon (its pid, mode) or the kernel.
    pub source: String,
    pub tracked: u64,
    pub by_state: Vec<(String, u64)>,
    pub ages: Vec<(String, u64)>,
    /// Destroys in the last minute by reason; None without a daemon.
    pub last_minute: Option<Vec<(String, u64)>>,
    pub dry_run: bool,
    /// Records the kernel side could not keep (map full, ring full).
    pub drops: u64,
    pub oldest: Vec<Row>,
    pub idle: Vec<Row>,
}

fn pairs(m: &std::collections::BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

fn rows(
    client: &mut Client,
    filter: &Filter,
    sort: SortKey,
    limit: Option<usize>,
) -> Result<Vec<Row>> {
    let q = Query::from_filter(&Filter {
        sort,
        limit,
        ..filter.clone()
    });
    #[derive(serde::Deserialize)]
    struct Listed {
        rows: Vec<Row>,
    }
    let reply: Listed = client.request_as(&list_request(&q))?;
    Ok(reply.rows)
}

/// Whether a filter leaves every connection in.
fn is_open(filter: &Filter) -> bool {
    Filter {
        sort: SortKey::default(),
        limit: None,
        ..filter.clone()
    } == Filter::default()
}

/// Counts by state, the age histogram, the oldest and the most idle of some rows
/// (sorted oldest first).
#[allow(clippy::type_complexity)]
fn summarize(rows: &[Row]) -> (Vec<(String, u64)>, Vec<(String, u64)>, Vec<Row>, Vec<Row>) {
    let mut by_state = std::collections::BTreeMap::<String, u64>::new();
    for r in rows {
        *by_state.entry(r.state.clone()).or_default() += 1;
    }
    let mut by_state: Vec<(String, u64)> = by_state.into_iter().collect();
    by_state.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let hist = age_histogram(
        rows.iter()
            .filter_map(|r| r.age_secs.or(r.age_at_least_secs))
            .map(|s| (s * 1e9) as u64),
    );
    let ages = hist
        .iter()
        .enumerate()
        .map(|(i, n)| (bucket_label(i), *n))
        .collect();
    let oldest = rows.iter().take(SHOWN).cloned().collect();
    let mut idle: Vec<Row> = rows.to_vec();
    idle.sort_by(|a, b| {
        b.idle_secs
            .unwrap_or(-1.0)
            .total_cmp(&a.idle_secs.unwrap_or(-1.0))
    });
    idle.truncate(SHOWN);
    (by_state, ages, oldest, idle)
}

/// The view from a running daemon.
pub fn from_daemon(client: &mut Client, filter: &Filter) -> Result<View> {
    let s: Status = client.request_as(&json!({"cmd": "status"}))?;
    let dry_run = !s.enforce;
    let ages = s.ages.iter().map(|b| (b.bucket.clone(), b.count)).collect();
    let by_state = pairs(&s.by_state)
        .into_iter()
        .filter(|(state, _)| state != "LISTEN")
        .collect();
    let mut view = View {
        source: format!(
            "daemon {} \u{b7} {} \u{b7} up {}",
            s.pid,
            if dry_run { "dry run" } else { "enforcing" },
            match s.uptime_secs {
                0 => "0s".to_string(),
                n => human(Duration::from_secs(n)),
            }
        ),
        tracked: s.tracked,
        by_state,
        ages,
        last_minute: Some(pairs(&s.last_minute)),
        dry_run,
        drops: s.kernel.map_full + s.kernel.ring_full + s.kernel.recursion_misses,
        oldest: Vec::new(),
        idle: Vec::new(),
    };
    if is_open(filter) {
        view.oldest = rows(client, filter, SortKey::Age, Some(SHOWN))?;
        view.idle = rows(client, filter, SortKey::Idle, Some(SHOWN))?;
    } else {
        // The counts and ages of the chosen connections only.
        let all = rows(client, filter, SortKey::Age, None)?;
        (view.by_state, view.ages, view.oldest, view.idle) = summarize(&all);
        view.tracked = all.len() as u64;
        view.source.push_str(" \u{b7} filtered");
    }
    Ok(view)
}

/// The view from the kernel's socket table and the pinned map, without a daemon.
pub fn from_kernel(filter: &Filter) -> Result<View> {
    let f = Filter {
        sort: SortKey::Age,
        limit: None,
        ..filter.clone()
    };
    let (items, _) = f.apply(read_local()?.into_iter());
    let rows: Vec<Row> = items.iter().map(Item::row).collect();
    let (by_state, ages, oldest, idle) = summarize(&rows);
    Ok(View {
        source: format!(
            "no daemon: the kernel's table{}",
            if is_open(filter) {
                ""
            } else {
                " \u{b7} filtered"
            }
        ),
        tracked: rows.len() as u64,
        by_state,
        ages,
        last_minute: None,
        dry_run: true,
        drops: 0,
        oldest,
        idle,
    })
}

fn fetch(socket: &Path, filter: &Filter) -> Result<View> {
    match Client::connect(socket)? {
        Some(mut client) => from_daemon(&mut client, filter),
        None => from_kernel(filter),
    }
}

fn bar(n: u64, max: u64, width: usize) -> String {
    if max == 0 || n == 0 {
        return String::new();
    }
    let w = ((n as f64 / max as f64) * width as f64).ceil() as usize;
    "\u{2588}".repeat(w.clamp(1, width))
}

/// A connection table; with `traffic` its fifth column is what each connection
/// received and sent (IN/OUT) instead of its idle time, all in 80 columns.
fn conn_table<'a>(title: &'a str, rows: &'a [Row], height: u16, traffic: bool) -> Table<'a> {
    let shown = usize::from(height.saturating_sub(3));
    let lines = rows.iter().take(shown).map(move |r| {
        TableRow::new(vec![
            r.local.clone(),
            r.remote.clone(),
            r.state.clone(),
            show_age(r.age_secs, r.age_at_least_secs),
            if traffic {
                format!("{}/{}", show_bytes(r.bytes_in), show_bytes(r.bytes_out))
            } else {
                r.idle_secs
                    .map_or("-".into(), |s| human(Duration::from_secs_f64(s)))
            },
            // The container, where the cgroup names one: what an operator of a node
            // looks for first.
            match (&r.process, &r.container) {
                (Some(p), Some(c)) => format!("{p} {c}"),
                (None, Some(c)) => c.clone(),
                (Some(p), None) => p.clone(),
                (None, None) => "-".into(),
            },
        ])
    });
    Table::new(
        lines,
        [
            Constraint::Length(21),
            Constraint::Length(21),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(if traffic { 9 } else { 6 }),
            Constraint::Min(4),
        ],
    )
    .header(
        TableRow::new(vec![
            "LOCAL",
            "REMOTE",
            "STATE",
            "AGE",
            if traffic { "IN/OUT" } else { "IDLE" },
            "OWNER",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(Block::bordered().title(title))
}

/// Draws one frame of the view (or of the error that stood in its way).
pub fn draw(f: &mut Frame, view: &View, error: Option<&str>) {
    let [title, panels, tables] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(9),
        Constraint::Min(0),
    ])
    .areas(f.area());
    let head = match error {
        Some(e) => format!("connwatch top \u{b7} error: {e}"),
        None => format!(
            "connwatch top \u{b7} {} \u{b7} {} conns{}",
            view.source,
            view.tracked,
            if view.drops > 0 {
                format!(" \u{b7} {} kernel drops", view.drops)
            } else {
                String::new()
            }
        ),
    };
    let [head_area, keys_area] =
        Layout::horizontal([Constraint::Min(0), Constraint::Length(7)]).areas(title);
    f.render_widget(
        Paragraph::new(head).style(Style::default().add_modifier(Modifier::BOLD)),
        head_area,
    );
    f.render_widget(Paragraph::new("q quit"), keys_area);

    let [states_area, ages_area, destroys_area] = Layout::horizontal([
        Constraint::Length(22),
        Constraint::Min(24),
        Constraint::Length(24),
    ])
    .areas(panels);
    let inner = usize::from(panels.height.saturating_sub(2));
    let states: Vec<Line> = view
        .by_state
        .iter()
        .take(inner)
        .map(|(s, n)| Line::from(format!("{s:<12}{n:>8}")))
        .collect();
    f.render_widget(
        Paragraph::new(states).block(Block::bordered().title("States")),
        states_area,
    );
    let max = view.ages.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let bar_width = usize::from(ages_area.width.saturating_sub(2 + 6 + 8)).max(1);
    let ages: Vec<Line> = view
        .ages
        .iter()
        .map(|(label, n)| {
            Line::from(format!(
                "{label:<5} {:<bar_width$}{n:>7}",
                bar(*n, max, bar_width)
            ))
        })
        .collect();
    f.render_widget(
        Paragraph::new(ages).block(Block::bordered().title("Ages")),
        ages_area,
    );
    let (title, lines): (&str, Vec<Line>) = match &view.last_minute {
        None => ("Destroys/min", vec![Line::from("no daemon")]),
        Some(by_reason) => {
            let title = if view.dry_run {
                "Would destroy/min"
            } else {
                "Destroyed/min"
            };
            let lines = if by_reason.is_empty() {
                vec![Line::from("none")]
            } else {
                by_reason
                    .iter()
                    .take(inner)
                    .map(|(r, n)| Line::from(format!("{r:<15}{n:>6}")))
                    .collect()
            };
            (title, lines)
        }
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        destroys_area,
    );

    let [oldest_area, idle_area] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(tables);
    f.render_widget(
        conn_table("Oldest", &view.oldest, oldest_area.height, true),
        oldest_area,
    );
    f.render_widget(
        conn_table("Most idle", &view.idle, idle_area.height, false),
        idle_area,
    );
}

fn quits(ev: &Event) -> bool {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            matches!(
                k.code,
                KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc
            ) || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

pub fn run(filter: &Filter, socket: &Path) -> Result<()> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("connwatch top needs a terminal; for scripts use `connwatch list --json`");
    }
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> Result<()> {
        let mut view = View::default();
        loop {
            let error = match fetch(socket, filter) {
                Ok(v) => {
                    view = v;
                    None
                }
                Err(e) => Some(format!("{e:#}")),
            };
            let next = Instant::now() + REFRESH;
            terminal.draw(|f| draw(f, &view, error.as_deref()))?;
            // Wait out the second, redrawing on a resize, leaving on q.
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                let ev = event::read()?;
                if quits(&ev) {
                    return Ok(());
                }
                if let Event::Resize(..) = ev {
                    terminal.draw(|f| draw(f, &view, error.as_deref()))?;
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn row(local: &str, age: f64) -> Row {
        Row {
            local: local.into(),
            remote: "127.0.0.1:8080".into(),
            state: "ESTABLISHED".into(),
            netns: 4026531840,
            cookie: 1,
            age_secs: Some(age),
            age_at_least_secs: None,
            state_secs: Some(age),
            idle_secs: Some(age / 2.0),
            direction: Some("in".into()),
            cgroup: None,
            container: None,
            pid: Some(42),
            process: Some("curl".into()),
            next_rule: None,
            next_in_secs: None,
            protected: None,
            bytes_in: Some(1_300_000),
            bytes_out: Some(512),
            segs_in: None,
            segs_out: None,
            retrans: None,
        }
    }

    #[test]
    fn fits_an_80_by_24_terminal() {
        let view = View {
            source: "daemon 4242 \u{b7} dry run \u{b7} up 3m".into(),
            tracked: 12,
            by_state: vec![("ESTABLISHED".into(), 10), ("CLOSE_WAIT".into(), 2)],
            ages: (0..7).map(|i| (bucket_label(i), i as u64)).collect(),
            last_minute: Some(vec![("max-age".into(), 3)]),
            dry_run: true,
            drops: 0,
            oldest: (0..10)
                .map(|i| row(&format!("127.0.0.1:{}", 40000 + i), 252.0))
                .collect(),
            idle: vec![row("127.0.0.1:50000", 7_380.0)],
        };
        let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
        t.draw(|f| draw(f, &view, None)).unwrap();
        let screen: Vec<String> = t
            .backend()
            .buffer()
            .content
            .chunks(80)
            .map(|c| c.iter().map(|cell| cell.symbol()).collect())
            .collect();
        let all = screen.join("\n");
        assert!(
            screen[0].contains("daemon 4242") && screen[0].trim_end().ends_with("q quit"),
            "{all}"
        );
        for want in [
            "ESTABLISHED       10",
            "CLOSE_WAIT         2",
            "Would destroy/min",
            "max-age             3",
            "<10s",
            ">=1w",
            "Oldest",
            "127.0.0.1:40000",
            "4m12s",
            "Most idle",
            "2h3m",
            "curl",
            "IN/OUT",
            "1.2M/512",
        ] {
            assert!(all.contains(want), "{want:?} not on the screen:\n{all}");
        }
    }

    #[test]
    fn q_and_escape_quit() {
        use ratatui::crossterm::event::KeyEvent;
        let key = |c| Event::Key(KeyEvent::new(c, KeyModifiers::NONE));
        assert!(quits(&key(KeyCode::Char('q'))));
        assert!(quits(&key(KeyCode::Esc)));
        assert!(!quits(&key(KeyCode::Char('x'))));
        assert!(quits(&Event::Key(KeyEvent::new(
            KeyCode::Char('c'),
            KeyModifiers::CONTROL
        ))));
    }
}
