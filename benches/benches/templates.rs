//! nginx template render. Run: `cargo bench -p pinacle-benches --bench templates`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn render(c: &mut Criterion) {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/pod-nginx.example.toml"
    ))
    .unwrap_or_else(|e| unreachable!("{e}"));
    let config = nginx_templates::parse(&example)
        .and_then(|f| {
            f.validate()
                .map_err(nginx_templates::TemplateError::Invalid)
        })
        .unwrap_or_else(|e| unreachable!("{e}"));
    c.bench_function("templates/render_example", |b| {
        b.iter(|| nginx_templates::render(black_box(&config)))
    });
    c.bench_function("templates/parse_validate_render_example", |b| {
        b.iter(|| nginx_templates::render_text(black_box(&example)))
    });
}

criterion_group!(benches, render);
criterion_main!(benches);
