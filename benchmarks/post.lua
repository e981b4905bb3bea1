-- wrk script: POST a small OpenAI chat request and print one machine-readable
-- result line at the end.
--
--   wrk -t2 -c50 -d10s --latency -s benchmarks/post.lua http://127.0.0.1:PORT/v1/chat/completions
--   WRK_STREAM=1 wrk ... (same, with "stream": true: the SSE run)
--
-- done() prints "WRK_RESULT {json}" with counts and latency percentiles in
-- microseconds; benchmarks/run.py parses that line.

local stream = os.getenv("WRK_STREAM") == "1"
-- WRK_DELAY_MS=N: each connection waits N ms between requests (a steady rate
-- for benchmarks/soak.py instead of as fast as possible).
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if delay_ms then
  function delay()
    return delay_ms
  end
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-not-a-real-key"
if stream then
  wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
    .. '"stream":true,"stream_options":{"include_usage":true}}'
else
  wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
end

done = function(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1e6
  local ok = summary.requests - e.status
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_s":%.6f,"bytes":%d,"rps":%.2f,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"ok":%d,"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%d,"max":%d,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, seconds, summary.bytes, summary.requests / seconds,
    e.connect, e.read, e.write, e.status, e.timeout,
    ok, latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
