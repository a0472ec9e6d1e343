# PostgreSQL client for the database tests (ruby-pg, i.e. libpq): the extended protocol
# (exec_params, prepare/exec_prepared), an error inside it, and a pipeline of three queries
# sent before one Sync. Usage: pg_client.rb PORT PASSWORD
require "pg"

port, password = ARGV
conn = PG.connect(host: "127.0.0.1", port: port.to_i, user: "postgres", password: password,
                  dbname: "postgres", sslmode: "disable")
conn.exec_params("SELECT name FROM cats WHERE id = $1", [1]).each { |r| puts r["name"] }
conn.prepare("cat_by_id", "SELECT name FROM cats WHERE id = $1")
[2, 3].each { |id| conn.exec_prepared("cat_by_id", [id]).each { |r| puts r["name"] } }
begin
  conn.exec_params("SELECT 1 / $1::int", [0])
rescue PG::DivisionByZero => e
  puts "error: #{e.message.lines.first.strip}"
end
conn.enter_pipeline_mode
conn.send_query_params("UPDATE cats SET name = $1 WHERE id = $2", ["Tom", 1])
conn.send_query_params("SELECT count(*) FROM cats", [])
conn.send_query_params("INSERT INTO cats (id, name) VALUES ($1, $2)", [100, "Kit"])
conn.pipeline_sync
results = 0
loop do
  res = conn.get_result
  if res.nil?
    next
  end
  break if res.result_status == PG::PGRES_PIPELINE_SYNC
  results += 1
end
conn.exit_pipeline_mode
puts "pipeline: #{results}"
conn.close
