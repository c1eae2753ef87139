// An unmodified @sentry/node reporting to boxoffice's ingress: node report.js <dsn>
// Prints {"event_id": ..., "feedback_id": ...} once everything is flushed.
const Sentry = require("@sentry/node");

async function main() {
  Sentry.init({ dsn: process.argv[2], release: "jobs@1.4.0", environment: "production",
                tracesSampleRate: 1.0 });
  Sentry.addBreadcrumb({ category: "queue", message: "took job 17", level: "info" });
  Sentry.getCurrentScope().addAttachment({ filename: "job.json", data: '{"job": 17}',
                                           contentType: "application/json" });
  let eventId;
  try {
    JSON.parse("{not json");
  } catch (err) {
    eventId = Sentry.captureException(err);
  }
  Sentry.getCurrentScope().clearAttachments();
  const feedbackId = Sentry.captureFeedback({ message: "The export never arrived", name: "Dee",
                                              email: "dee@example.com", associatedEventId: eventId });
  const checkInId = Sentry.captureCheckIn(
    { monitorSlug: "node-export", status: "in_progress" },
    { schedule: { type: "crontab", value: "30 4 * * *" }, checkinMargin: 2, maxRuntime: 10,
      timezone: "UTC" });
  Sentry.captureCheckIn({ checkInId, monitorSlug: "node-export", status: "ok", duration: 3 });
  await Sentry.startSpan({ name: "export" }, async () => {});
  await Sentry.flush(10000);
  console.log(JSON.stringify({ event_id: eventId, feedback_id: feedbackId }));
}

main().catch((err) => { console.error(err); process.exit(1); });
