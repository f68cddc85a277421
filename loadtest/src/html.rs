//! Self-contained HTML reports: tables and inline SVG plots, no scripts,
//! no external files.

use std::fmt::Write as _;

use crate::report::{Percentiles, Report};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:980px}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
.pass{color:#fff;background:#2a7d2a;padding:4px 10px}.fail{color:#fff;background:#b22;padding:4px 10px}\
svg{background:#fafafa;border:1px solid #ddd}";

/// One line of a chart: name, colour, points (x, y).
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart: `series` of (name, colour, points (x, y)); `shade` marks
/// an x range (the warm-up).
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    shade: Option<(f64, f64)>,
    x_ticks: &[(f64, String)],
) -> String {
    let (w, h, left, bottom, top, right) = (900.0, 300.0, 60.0, 40.0, 30.0, 20.0);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
    let x_max = all.iter().map(|p| p.0).fold(1e-9, f64::max);
    let x_min = all.iter().map(|p| p.0).fold(x_max, f64::min).min(0.0);
    let y_max = all.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
    let sx = |x: f64| left + (x - x_min) / (x_max - x_min).max(1e-9) * (w - left - right);
    let sy = |y: f64| h - bottom - y / y_max * (h - bottom - top);
    let mut svg = format!(
        "<svg width=\"{w}\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"{left}\" y=\"18\" font-weight=\"bold\">{}</text>",
        esc(title)
    );
    if let Some((a, b)) = shade {
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"11\" fill=\"#888\">warm-up</text>",
            sx(a),
            (sx(b) - sx(a)).max(0.0),
            h - bottom - top,
            sx(a) + 3.0,
            top + 12.0
        );
    }
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{y:.1}</text>",
            w - right,
            sy(y),
            sy(y),
            left - 4.0,
            sy(y) + 4.0
        );
    }
    for (x, label) in x_ticks {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            sx(*x),
            h - bottom + 16.0,
            esc(label)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\
         <text x=\"14\" y=\"{:.1}\" font-size=\"12\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{}</text>",
        (left + w - right) / 2.0,
        h - 6.0,
        esc(x_label),
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for (n, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in points {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                sx(*x),
                sy(*y)
            );
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"{colour}\">{}</text>",
            w - right - 120.0,
            top + 14.0 + 16.0 * n as f64,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn percentile_table(rows: &[(String, &Percentiles)]) -> String {
    let mut t = String::from(
        "<table><tr><th>latency, ms</th><th>count</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>",
    );
    for (name, p) in rows {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(name),
            p.count,
            p.p50,
            p.p90,
            p.p95,
            p.p99,
            p.p999,
            p.max
        );
    }
    t.push_str("</table>");
    t
}

/// "Nines" position of a quantile: 0.9 → 1, 0.99 → 2, 0.999 → 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// The HTML report of one run.
pub fn report(r: &Report) -> String {
    let mut out = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>recmesh load test</title><style>{STYLE}</style></head><body>\
         <h1>recmesh load test</h1><p><span class=\"{}\">SLO {}</span></p><ul>",
        if r.verdict.pass { "pass" } else { "fail" },
        if r.verdict.pass { "PASS" } else { "FAIL" }
    );
    for c in &r.verdict.checks {
        let _ = write!(out, "<li>{}</li>", esc(c));
    }
    let _ = write!(
        out,
        "</ul><p>{:.1}/s offered, {:.1}/s achieved; {} measured over {} s after a {} s warm-up ({} sent). \
         Latency runs from each request's intended send time (open loop).</p>",
        r.offered_rate,
        r.achieved_rate,
        r.measured,
        r.scenario.duration_s,
        r.scenario.warmup_s,
        r.sent
    );
    let warm = r.scenario.warmup_s;
    let p50: Vec<(f64, f64)> = r.timeline.iter().map(|s| (s.t as f64, s.p50)).collect();
    let p99: Vec<(f64, f64)> = r.timeline.iter().map(|s| (s.t as f64, s.p99)).collect();
    let last = r.timeline.last().map_or(1, |s| s.t);
    let ticks: Vec<(f64, String)> = (0..=last)
        .step_by(((last / 10).max(1)) as usize)
        .map(|t| (t as f64, format!("{t}s")))
        .collect();
    out.push_str(&line_chart(
        "Latency over time (per second)",
        "time",
        "ms",
        &[("p50", "#1f77b4", p50), ("p99", "#d62728", p99)],
        (warm > 0.0).then_some((0.0, warm)),
        &ticks,
    ));
    let qs = |p: &Percentiles| -> Vec<(f64, f64)> {
        vec![
            (nines(0.5), p.p50),
            (nines(0.9), p.p90),
            (nines(0.95), p.p95),
            (nines(0.99), p.p99),
            (nines(0.999), p.p999),
        ]
    };
    let colours = [
        "#222", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let mut series: Vec<Series<'_>> = vec![("all calls", colours[0], qs(&r.latency))];
    for (n, (k, p)) in r.per_call.iter().enumerate() {
        series.push((k.as_str(), colours[(n + 1) % colours.len()], qs(p)));
    }
    let pticks: Vec<(f64, String)> = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")]
        .iter()
        .map(|(q, l)| (nines(*q), l.to_string()))
        .collect();
    out.push_str("<p></p>");
    out.push_str(&line_chart(
        "Latency by percentile",
        "percentile",
        "ms",
        &series,
        None,
        &pticks,
    ));
    let mut rows: Vec<(String, &Percentiles)> = vec![("all calls".into(), &r.latency)];
    rows.extend(r.per_call.iter().map(|(k, p)| (k.clone(), p)));
    rows.extend(
        r.per_stage
            .iter()
            .map(|(k, p)| (format!("stage {k} (gateway side)"), p)),
    );
    out.push_str(&percentile_table(&rows));
    let _ = write!(
        out,
        "<p>Errors: {} ({:.3}%). Degraded answers: {:.2}%. Recommends answered from the gateway's response cache: {:.1}%{}.</p>",
        if r.errors.is_empty() {
            "none".into()
        } else {
            esc(&r
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "))
        },
        r.error_rate * 100.0,
        r.degraded_rate * 100.0,
        r.cache_hit_rate * 100.0,
        if r.scenario.bypass_cache {
            " (bypass_cache: every Recommend sent cache-control: no-cache)"
        } else {
            ""
        }
    );
    if !r.fallbacks.is_empty() {
        out.push_str("<table><tr><th>fallback (stage:name)</th><th>answers</th></tr>");
        for (k, v) in &r.fallbacks {
            let _ = write!(out, "<tr><td>{}</td><td>{v}</td></tr>", esc(k));
        }
        out.push_str("</table>");
    }
    let _ = write!(
        out,
        "<h2>Scenario</h2><pre>{}</pre></body></html>",
        esc(&toml::to_string_pretty(&r.scenario).unwrap_or_default())
    );
    out
}

/// The HTML report of a step run.
pub fn steps(reports: &[Report]) -> String {
    let best = reports
        .iter()
        .filter(|r| r.verdict.pass)
        .map(|r| r.offered_rate)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let mut out = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>recmesh capacity</title><style>{STYLE}</style></head><body>\
         <h1>recmesh capacity (step mode)</h1><p>Highest rate that held the SLO: <b>{}</b></p>",
        best.map_or("none".to_owned(), |b| format!("{b:.0}/s"))
    );
    let p99: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.offered_rate, r.latency.p99))
        .collect();
    let p50: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.offered_rate, r.latency.p50))
        .collect();
    let ticks: Vec<(f64, String)> = reports
        .iter()
        .map(|r| (r.offered_rate, format!("{:.0}", r.offered_rate)))
        .collect();
    out.push_str(&line_chart(
        "Latency by offered rate",
        "requests per second",
        "ms",
        &[("p50", "#1f77b4", p50), ("p99", "#d62728", p99)],
        None,
        &ticks,
    ));
    out.push_str("<table><tr><th>offered/s</th><th>achieved/s</th><th>p50</th><th>p99</th><th>p99.9</th><th>errors</th><th>degraded</th><th>verdict</th></tr>");
    for r in reports {
        let _ = write!(
            out,
            "<tr><td>{:.0}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.3}%</td><td>{:.2}%</td><td>{}</td></tr>",
            r.offered_rate,
            r.achieved_rate,
            r.latency.p50,
            r.latency.p99,
            r.latency.p999,
            r.error_rate * 100.0,
            r.degraded_rate * 100.0,
            if r.verdict.pass { "PASS" } else { "FAIL" }
        );
    }
    out.push_str("</table></body></html>");
    out
}
