-- Prints one machine-readable line per wrk run: requests/s, latency percentiles (µs), errors.
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout + e.status
  io.write(string.format("RESULT rps=%.1f p50_us=%d p99_us=%d p999_us=%d errors=%d requests=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), errors, summary.requests))
end
