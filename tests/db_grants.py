"""What each service's PostgreSQL role may do: the decision, object by object.

tests/test_db_roles.py compares it with the catalog of a migrated database, both ways. A table,
sequence or function added by a migration (or a function file of libs/boxoffice/sql) is in the
catalog, so it must be listed here (with no role when no service may touch it) and granted there
to exactly the roles listed. The owner (the role that runs the migrations) holds everything and
is not listed; PUBLIC holds nothing.

Privileges are written as PostgreSQL names them; ``UPDATE(a,b)`` is a grant on those columns
only. A service's row lock (FOR UPDATE) needs UPDATE on one column, which is why the outbox
relays and retention hold UPDATE on one timestamp they never write.
"""

from __future__ import annotations

ALL = ("payment", "webhook", "error_sink", "reaper")
RELAYS = {"payment": "SELECT INSERT DELETE UPDATE(created_at)",
          "webhook": "SELECT INSERT DELETE UPDATE(created_at)",
          "reaper": "SELECT INSERT DELETE UPDATE(created_at)"}

# table -> service -> privileges
TABLES: dict[str, dict[str, str]] = {
    "schema_migrations": {s: "SELECT" for s in ALL},
    "schema_functions": {s: "SELECT" for s in ALL},
    "outbox": RELAYS,
    "ticketed_events": {"payment": "SELECT INSERT", "webhook": "SELECT", "reaper": "SELECT"},
    "inventory_buckets": {"payment": "SELECT INSERT UPDATE(held)",
                          "webhook": "SELECT UPDATE(held,sold)",
                          "reaper": "SELECT UPDATE(held)"},
    "reservations": {
        "payment": "SELECT INSERT UPDATE(status,released_at,updated_at,request_fingerprint,"
                   "response_body,payment_intent_id,payment_idempotency_key)",
        "webhook": "SELECT INSERT DELETE UPDATE(status,completed_at,released_at,updated_at,"
                   "payment_intent_id)",
        "reaper": "SELECT UPDATE(status,released_at,updated_at,idempotency_key,"
                  "request_fingerprint,response_body)"},
    "reservation_allocations": {"payment": "SELECT INSERT",
                                "webhook": "SELECT INSERT DELETE UPDATE(reservation_id)",
                                "reaper": "SELECT"},
    "payment_intents_log": {
        "payment": "SELECT INSERT UPDATE(recovery_point,locked_at,lease_token,attempts,"
                   "response_status,response_body,stripe_payment_intent_id,last_error,updated_at)",
        "webhook": "SELECT(stripe_payment_intent_id)",
        "reaper": "SELECT(id,created_at) DELETE UPDATE(created_at)"},
    "payments": {
        "payment": "SELECT(payment_intent_id,reservation_id,amount,status) INSERT",
        "webhook": "SELECT INSERT UPDATE(status,status_event_created,reservation_id,refund_id,"
                   "refund_reason,updated_at)",
        "reaper": "SELECT"},
    "stripe_actions": {
        "payment": "SELECT(id,kind,payment_intent_id) INSERT",
        "webhook": "SELECT INSERT UPDATE(status,attempts,next_attempt_at,result_id,detail,"
                   "last_error,done_at,updated_at)",
        "reaper": "SELECT INSERT"},
    "webhook_events_log": {
        "webhook": "SELECT INSERT UPDATE(processing_status,attempts,last_error,processed_at)",
        "reaper": "SELECT(event_id,event_type,processing_status,attempts,last_error,received_at,"
                  "processed_at) DELETE UPDATE(processed_at)"},
    "stripe_reconciliation": {"webhook": "SELECT UPDATE(events_until,intents_until,lease_token,"
                                         "lease_until,last_started_at)"},
    "stripe_reconcile_runs": {"webhook": "SELECT INSERT DELETE UPDATE(finished_at,error,"
                                         "events_seen,events_recovered,intents_checked,"
                                         "intents_corrected,orphans_found)"},
    "stripe_orphans": {"webhook": "SELECT INSERT"},
    "stripe_reconcile_checks": {"webhook": "SELECT INSERT DELETE UPDATE(checked_at)"},
    "error_logs": {"error_sink": "SELECT INSERT UPDATE(resolved)",
                   "reaper": 'SELECT(id,"timestamp",received_at) DELETE UPDATE(received_at)'},
    "error_groups": {"error_sink": "SELECT INSERT UPDATE(status,level,first_seen,last_seen,count,"
                                   "resolved_at,regressed_at,rate_window_start,rate_window_count,"
                                   "last_alerted_at)"},
    "error_alerts": {"error_sink": "SELECT INSERT UPDATE(published_at,notified_at,attempts,"
                                   "publish_attempts,next_attempt,last_error)"},
    "error_feedback": {"error_sink": "SELECT INSERT",
                       "reaper": "SELECT(id,received_at) DELETE UPDATE(received_at)"},
    "error_attachments": {"error_sink": "SELECT INSERT",
                          "reaper": "SELECT(id,received_at) DELETE UPDATE(received_at)"},
    "error_discards": {"error_sink": "SELECT INSERT",
                       "reaper": "SELECT(report_id,origin,reason,category,received_at) DELETE "
                                 "UPDATE(received_at)"},
    "monitors": {"error_sink": "SELECT INSERT UPDATE(project_id,schedule_type,schedule_value,"
                               "schedule_unit,checkin_margin,max_runtime,timezone,status,"
                               "last_checkin_at,last_checkin_status,last_duration,next_expected_at)",
                 "reaper": "SELECT UPDATE(status,next_expected_at)"},
    "monitor_checkins": {"error_sink": "SELECT INSERT UPDATE(status,updated_at,duration,environment)",
                         "reaper": "SELECT DELETE UPDATE(timed_out_at)"},
    "release_sessions": {"error_sink": "SELECT INSERT UPDATE(status,errors,updated_at,did)",
                         "reaper": "SELECT(service,sid,updated_at) DELETE UPDATE(updated_at)"},
    "release_session_buckets": {"error_sink": "SELECT INSERT",
                                "reaper": "SELECT(message_id,idx,started) DELETE UPDATE(started)"},
    "source_maps": {"error_sink": "SELECT INSERT UPDATE(map,size,uploaded_at,debug_id)"},
    "reaper_runs": {"reaper": "SELECT INSERT"},
    "admin_actions": {"reaper": "SELECT INSERT UPDATE"},
    "audit_checks": {s: "SELECT UPDATE(checkpoint,started_at,finished_at,mode,examined,in_flight,"
                        "violations,new_violations,resolved,seconds,error,replica,last_full_at)"
                     for s in ("webhook", "reaper")},
    "audit_findings": {s: "SELECT INSERT UPDATE(subject_ids,expected,found,last_seen,seen,"
                          "resolved_at)" for s in ("webhook", "reaper")},
    "audit_bucket_marks": {"reaper": "SELECT INSERT DELETE UPDATE(held,sold)"},
}

# sequence -> services with USAGE (nextval, for the table's default)
SEQUENCES: dict[str, set[str]] = {
    "outbox_id_seq": set(RELAYS),
    "payment_intents_log_id_seq": {"payment"},
    "stripe_actions_id_seq": {"payment", "webhook", "reaper"},
    "stripe_reconcile_runs_id_seq": {"webhook"},
    "reaper_runs_id_seq": {"reaper"},
    "audit_findings_id_seq": {"webhook", "reaper"},
}

# function -> services with EXECUTE. Trigger functions need none (a trigger runs its function
# whoever fires it); what they call does.
HOLDS = {"payment", "webhook"}  # hold paths: a payment for a hold that ended holds again
ENDS_HOLDS = {"payment", "webhook", "reaper"}
FUNCTIONS: dict[str, set[str]] = {
    "create_ticketed_event": {"payment"},
    "hold_tickets": HOLDS,
    "hold_tickets_in": HOLDS,
    "hold_probe": HOLDS,
    "hold_record": HOLDS,
    "hold_tickets_batch": {"payment"},
    "try_lock_hold_key": {"payment"},
    "release_reservation": HOLDS,
    "expire_due_reservations": ENDS_HOLDS,
    "reap_due_reservations": ENDS_HOLDS,
    "request_stripe_action": ENDS_HOLDS,
    "claim_payment_intent": {"payment"},
    "record_payment_intent": {"payment"},
    "apply_stripe_event": {"webhook"},
    "apply_stripe_events": {"webhook"},
    "apply_succeeded_events": {"webhook"},
    "advance_payment": {"webhook"},
    "payment_status_rank": {"webhook"},
    "emit_payment_event": {"webhook"},
    "complete_reservation": {"webhook"},
    "lock_hold_buckets": {"webhook"},
    "return_reservation_tickets": {"webhook"},
    "claim_stripe_actions": {"webhook"},
    "finish_stripe_action": {"webhook"},
    "get_reservation_stats": {"reaper"},
    # the operators' (the owner's)
    "cleanup_expired_reservations": set(),
    # triggers
    "outbox_notify": set(),
    "reservations_due_notify": set(),
    "reservation_shortened_notify": set(),
    "stripe_actions_notify": set(),
    "reservation_ended_cancel_intents": set(),
}
