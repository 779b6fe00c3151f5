//! The full-screen face of `mqbridge top` (ratatui on crossterm): a title, the status of the last
//! poll, and the table of [`view::rows`]. A task on the runtime polls `/status` every interval;
//! this thread draws and reads keys. `q`, Esc or Ctrl-C quits and gives the terminal back as it
//! was (also on a panic: ratatui's hook restores it first).

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{Cell, Row, Table},
};

use super::{
    TopOptions, fetch,
    view::{self, Health, Sample},
};

/// What is on screen.
struct Screen {
    admin: String,
    interval: Duration,
    before: Option<Sample>,
    now: Sample,
    /// The last poll's failure, while the next has not succeeded.
    error: Option<String>,
}

pub fn run(
    runtime: &tokio::runtime::Runtime,
    options: &TopOptions,
    first: Sample,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel();
    let admin = options.admin.clone();
    let interval = options.interval;
    let poller = runtime.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = fetch(&admin).await.map(|status| Sample {
                status,
                at: Instant::now(),
            });
            if tx.send(result).is_err() {
                return;
            }
        }
    });
    let mut screen = Screen {
        admin: options.admin.clone(),
        interval,
        before: None,
        now: first,
        error: None,
    };
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> std::io::Result<()> {
        // Drawn every turn (a tenth of a second): the ages on screen keep moving between polls,
        // and ratatui writes only the cells that changed.
        loop {
            terminal.draw(|frame| draw(frame, &screen))?;
            if event::poll(Duration::from_millis(100))? {
                match event::read()? {
                    Event::Key(key) if key.kind == KeyEventKind::Press => {
                        let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                            && matches!(key.code, KeyCode::Char('c'));
                        if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
            while let Ok(polled) = rx.try_recv() {
                match polled {
                    Ok(sample) => {
                        screen.before = Some(std::mem::replace(&mut screen.now, sample));
                        screen.error = None;
                    }
                    Err(e) => screen.error = Some(e),
                }
            }
        }
    })();
    ratatui::try_restore()?;
    poller.abort();
    result
}

fn draw(frame: &mut Frame, screen: &Screen) {
    let [title, status, table, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Line::from(view::title(&screen.now.status, &screen.admin)).bold(),
        title,
    );
    let age = view::age(screen.now.at.elapsed());
    let line = match &screen.error {
        Some(e) => Line::from(vec![
            Span::from(format!("poll failed: {e}"))
                .fg(Color::Red)
                .bold(),
            Span::from(format!(" (showing the answer of {age} ago)")),
        ]),
        None => Line::from(format!(
            "polled {age} ago, every {}",
            humantime::format_duration(screen.interval)
        ))
        .dim(),
    };
    frame.render_widget(line, status);

    let rows = view::rows(screen.before.as_ref(), &screen.now);
    let cells: Vec<[String; 8]> = rows.iter().map(view::Row::cells).collect();
    let widths: Vec<Constraint> = (0..view::HEADER.len())
        .map(|i| {
            let widest = cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([view::HEADER[i].chars().count()])
                .max()
                .unwrap_or(0);
            if i + 1 == view::HEADER.len() {
                Constraint::Fill(1)
            } else {
                Constraint::Length(widest as u16)
            }
        })
        .collect();
    let align = |i: usize, text: String| -> Line<'static> {
        if view::NUMERIC[i] {
            Line::from(text).right_aligned()
        } else {
            Line::from(text)
        }
    };
    let header = Row::new(
        view::HEADER
            .iter()
            .enumerate()
            .map(|(i, h)| Cell::from(align(i, (*h).to_owned()))),
    )
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let body = rows.iter().zip(cells).map(|(row, cells)| {
        let colour = match row.health {
            Health::Good => Color::Green,
            Health::Busy => Color::Yellow,
            Health::Bad => Color::Red,
        };
        let line = Row::new(cells.into_iter().enumerate().map(|(i, text)| {
            let cell = Cell::from(align(i, text));
            match i {
                1 => cell.fg(colour),
                5 | 7 if row.dropped > 0 => cell.fg(Color::Red),
                _ => cell,
            }
        }));
        if row.is_route { line.bold() } else { line }
    });
    frame.render_widget(
        Table::new(body, widths).header(header).column_spacing(2),
        table,
    );
    frame.render_widget(Line::from("q, Esc or Ctrl-C: quit").dim(), keys);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::admin::status::{PairStatus, RouteStatus, Status};

    #[test]
    fn the_screen_shows_the_title_the_error_and_a_row_per_route_and_pair() {
        let pair = PairStatus {
            index: 0,
            state: "ready".into(),
            source_up: true,
            target_up: true,
            subscribed: true,
            received: 10,
            forwarded: 10,
            bytes_forwarded: 100,
            dropped: BTreeMap::from([("refused".into(), 1)]),
            in_flight: 2,
            window: 20,
            reconnects: 0,
            last_progress_age_ms: Some(1500),
            spool: None,
        };
        let status = Status {
            bridge: "edge-1".into(),
            instance: "pod-0".into(),
            version: "0.1.0".into(),
            uptime_s: 3,
            routes: vec![RouteStatus::from_pairs(
                "up",
                "edge",
                "cloud",
                1,
                vec![pair],
            )],
        };
        let screen = Screen {
            admin: "127.0.0.1:9464".into(),
            interval: Duration::from_secs(1),
            before: None,
            now: Sample {
                status,
                at: Instant::now(),
            },
            error: Some("cannot reach the admin endpoint at 127.0.0.1:9464".into()),
        };
        let mut terminal = Terminal::new(TestBackend::new(150, 8)).unwrap();
        terminal.draw(|f| draw(f, &screen)).unwrap();
        let text: Vec<String> = terminal
            .backend()
            .buffer()
            .content()
            .chunks(150)
            .map(|line| line.iter().map(|c| c.symbol()).collect())
            .collect();
        let all = text.join("\n");
        assert!(text[0].starts_with("mqbridge top: bridge edge-1"), "{all}");
        assert!(text[1].starts_with("poll failed: cannot reach"), "{all}");
        assert!(text[2].starts_with("ROUTE / PAIR"), "{all}");
        assert!(text[3].starts_with("up (edge → cloud)"), "{all}");
        assert!(text[4].starts_with("  pair 0"), "{all}");
        assert!(text[4].contains("2/20"), "{all}");
        assert!(text[4].contains("refused 1"), "{all}");
        assert!(text[7].starts_with("q, Esc or Ctrl-C: quit"), "{all}");
    }
}
